//! `kvrouter hash`: the router's view of a prompt's blocks, for checking that router and engine
//! agree on block boundaries (a mismatch silently gives zero overlap).
use std::io::Read;

use anyhow::Context;
use kvrouter_core::hash::{compute_block_hashes, compute_sequence_hashes, HashOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Tokens per KV block (must match the engine's block size).
    #[arg(long)]
    block_size: usize,
    /// LoRA adapter name (changes the hash seed).
    #[arg(long)]
    lora_name: Option<String>,
    /// Cache salt / namespace (changes the hash seed).
    #[arg(long)]
    cache_salt: Option<String>,
    /// Eagle mode: windows of block_size + 1 tokens.
    #[arg(long)]
    eagle: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.block_size > 0, "--block-size must be at least 1");
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    let tokens: Vec<u32> = serde_json::from_str(&input)
        .context("stdin must be a JSON array of token ids (unsigned 32-bit integers)")?;
    let opts = HashOptions {
        lora_name: args.lora_name.as_deref(),
        cache_salt: args.cache_salt.as_deref(),
        is_eagle: args.eagle,
    };
    let local = compute_block_hashes(&tokens, args.block_size, &opts, None);
    let sequence = compute_sequence_hashes(&local);
    let out = serde_json::json!({ "local": local, "sequence": sequence });
    println!("{out}");
    Ok(())
}
