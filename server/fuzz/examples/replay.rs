//! Replay fuzz inputs outside libFuzzer (stable toolchain) and print what the server did:
//! `cargo run --example replay -- request|http FILE...` (from `server/fuzz/`). For the `http`
//! target it prints the server's whole answer; for `request`, that the input passed.
//! Helps turn an artifact into a regression test (see README.md).

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_default();
    let files: Vec<String> = args.collect();
    if !matches!(target.as_str(), "request" | "http") || files.is_empty() {
        eprintln!("usage: replay request|http FILE...");
        std::process::exit(2);
    }
    for f in files {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{f}: {e}"));
        println!("== {f} ({} bytes)", data.len());
        match target.as_str() {
            "request" => {
                kvrouter_server_fuzz::fuzz_request(&data);
                println!("ok");
            }
            _ => {
                let [answered, listener] = kvrouter_server_fuzz::fuzz_http(&data);
                println!(
                    "-- with half-close:\n{}",
                    String::from_utf8_lossy(&answered)
                );
                println!(
                    "-- as the listener serves it:\n{}",
                    String::from_utf8_lossy(&listener)
                );
            }
        }
    }
}
