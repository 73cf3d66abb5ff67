//! The `keygate` command: manage a key list file, hash keys, validate
//! configuration, and serve a key list as the reference control plane.

mod envoy;
mod error;
mod hash;
mod keyfile;
mod keygen;
mod keys;
mod serve;
mod tls;
mod usage;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// keygate: API-key gatekeeper for Envoy.
///
/// Exit status: 0 on success, 1 on failure (each problem on stderr as
/// `error: ...`), 2 on a usage error.
#[derive(Debug, Parser)]
#[command(name = "keygate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, revoke and list keys in a key list file (keys.json).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Print the SHA-256 hex of a key read on stdin.
    ///
    /// One trailing newline (LF or CRLF) is removed, nothing else:
    /// `printf %s "$KEY" | keygate hash` and `echo "$KEY" | keygate hash` agree.
    Hash,
    /// Validate a plugin configuration or a key list exactly as the filter would.
    ///
    /// With --kind auto (the default), a top-level JSON object with a `version`
    /// field is a key list, anything else a plugin configuration. Prints
    /// `ok: N keys` on stdout, or one `error: <field>: <message>` line per
    /// problem on stderr and exits with status 1.
    Validate(validate::ValidateArgs),
    /// Serve a key list over HTTP: the reference control plane.
    ///
    /// GET /v1/keys answers the list as compact JSON with a strong ETag
    /// (the quoted hex SHA-256 of the body) and `Cache-Control: no-cache`;
    /// a matching If-None-Match gets 304. GET /healthz answers 200. The file
    /// is checked for changes every --poll-ms and reloaded; a broken file, or
    /// one with an older version, keeps the current list served and the
    /// reason is logged on stderr. POST /v1/usage takes the usage reports of
    /// Envoys (`control_plane.usage_report_interval`) into a file beside the
    /// list, which `keygate keys list` reads. HTTP/1.1; TLS and client
    /// certificates with --tls-cert, --tls-key and --client-ca.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keys(command) => keys::run(command),
        Command::Hash => hash::run(),
        Command::Validate(args) => validate::run(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            for line in &failure.lines {
                eprintln!("error: {line}");
            }
            ExitCode::FAILURE
        }
    }
}
