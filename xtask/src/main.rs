//! `cargo xtask`: the project's automation, in Rust, with no dependency heavier than clap.
//!
//! * `cargo xtask test`: the whole test suite (what CI runs after fmt and clippy);
//! * `cargo xtask demo`: the offline demo of the DNAL core.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "dnal project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run every test: the workspace in release mode (one profile for tests and binaries),
    /// each benchmark once, then the wgpu tests (skipped with a message when no adapter exists).
    Test {
        /// Skip the wgpu build and tests (they add several minutes to a cold build).
        #[arg(long)]
        no_wgpu: bool,
    },
    /// Run the DNAL core demo: learn which inputs a small gated network needs.
    Demo,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Test { no_wgpu } => {
            // --all-targets also builds the examples and runs each criterion benchmark once.
            cargo(
                &root,
                &["test", "--workspace", "--release", "--all-targets"],
            )?;
            if no_wgpu {
                println!("xtask: wgpu tests skipped (--no-wgpu)");
            } else {
                cargo(
                    &root,
                    &[
                        "test",
                        "--release",
                        "-p",
                        "dnal-core",
                        "--features",
                        "wgpu",
                        "--test",
                        "wgpu",
                    ],
                )?;
            }
            Ok(())
        }
        Task::Demo => cargo(
            &root,
            &[
                "run",
                "--release",
                "-p",
                "dnal-core",
                "--example",
                "gate_demo",
            ],
        ),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("could not start `{cargo}`"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
