//! `kvrouter mocker`: CPU-only mock vLLM workers. The flags and the logic live in
//! `kvrouter_mocker::cli` so that other binaries and tests can reuse them.
pub use kvrouter_mocker::cli::MockerArgs as Args;

pub fn run(args: Args) -> anyhow::Result<()> {
    kvrouter_mocker::cli::run(args)
}
