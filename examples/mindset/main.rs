//! Mindset: look inside a memory student. For each token of a prompt, the
//! memories each memory layer read (id, distance, weight, provenance) and
//! what the model predicts; for each memory, the tokens its value promotes
//! and the contexts that used it; browse, search, delete and forget.
//!
//! ```text
//! cargo run --release --example mindset -- serve runs/distill            # http://127.0.0.1:7878
//! cargo run --release --example mindset -- explain runs/distill "And God said"
//! ```
//!
//! Every view reads the run directory's stores through the memstore facade
//! (the memory layers search them directly), so a memory deleted or a
//! source forgotten, on the page or with the `memstore` tool, changes the
//! next answer. The server listens on 127.0.0.1 unless told otherwise; it
//! has no authentication, and anyone who reaches it can delete memories.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod inspector;
mod server;

use inspector::Inspector;

/// Look inside a memory student.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the inspector's page.
    Serve {
        /// The student's run directory (from distill_gpt2).
        run_dir: PathBuf,
        /// Address to listen on (loopback by default: the page can delete memories).
        #[arg(long, default_value = "127.0.0.1:7878")]
        addr: SocketAddr,
        /// Read this text through the model first, so that each memory shows the contexts that use it.
        #[arg(long)]
        contexts: Option<PathBuf>,
        /// Windows of 64 tokens of --contexts to read.
        #[arg(long, default_value_t = 32)]
        context_windows: usize,
    },
    /// Print, for each token of PROMPT, the likeliest next tokens and the
    /// memories each memory layer read.
    Explain {
        /// The student's run directory.
        run_dir: PathBuf,
        /// The text to explain.
        prompt: String,
        /// Next tokens shown per position.
        #[arg(long, default_value_t = 3)]
        top: usize,
        /// Memories shown per layer and position (the heaviest).
        #[arg(long, default_value_t = 3)]
        memories: usize,
        /// The whole explanation as JSON (every memory read).
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    match args.command {
        Command::Serve {
            run_dir,
            addr,
            contexts,
            context_windows,
        } => {
            if !addr.ip().is_loopback() {
                eprintln!("warning: listening on {addr}: anyone who reaches it can read and delete memories");
            }
            let text = contexts
                .map(|p| std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display())))
                .transpose()?;
            let handle = server::Handle::spawn(run_dir.clone(), move |i| {
                if let Some(t) = text {
                    let n = i.scan_contexts(&t, 64, context_windows)?;
                    eprintln!("read {n} tokens for contexts");
                }
                Ok(())
            })?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                eprintln!("mindset: {} on http://{}", run_dir.display(), listener.local_addr()?);
                axum::serve(listener, server::router(handle)).await
            })?;
        }
        Command::Explain {
            run_dir,
            prompt,
            top,
            memories,
            json,
        } => {
            let mut i = Inspector::open(&run_dir)?;
            if json {
                println!("{}", i.explain_prompt(&prompt, top)?);
            } else {
                print!("{}", i.explain_text(&prompt, top, memories)?);
            }
        }
    }
    Ok(())
}
