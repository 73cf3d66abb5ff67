//! `keygate keys create|revoke|list`.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use keygate_core::config::{KeyConfig, KeyList};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{print_stdout, Failure, Result};
use crate::keygen::Alphabet;
use crate::usage::{self, UsageFile};
use crate::{keyfile, keygen};

/// The `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a new key, store its SHA-256 in the key list, print the key once.
    ///
    /// The key is `<prefix>` followed by 32 random characters of [A-Za-z0-9]
    /// (about 190 bits) from the operating system's CSPRNG. Only the key and a
    /// newline go to stdout, so `KEY=$(keygate keys create ...)` works; the
    /// file gets its SHA-256 and a display form (prefix…last 4), never the key.
    /// The file is created if missing; its version grows by one.
    Create(CreateArgs),
    /// Disable a key (or delete its record with --delete).
    ///
    /// A disabled key is refused like an unknown one. The file's version grows by one.
    Revoke(RevokeArgs),
    /// List the keys: id, display form, scopes, environment, expiry, status,
    /// last use, requests in the last 24 h, label.
    ///
    /// Status is `disabled`, `expired` (now at or past `expires_at`) or `active`.
    /// Last use and requests come from the usage file `keygate serve` keeps
    /// from Envoys' usage reports: `never` and 0 for a key no report named.
    /// The file holds no keys, only digests, and neither is printed.
    List(ListArgs),
    /// Replace a key with an overlap: a new key for the same consumer, printed
    /// once, and the old key expiring after --overlap.
    ///
    /// Both keys work side by side under one identity (the consumer) and one
    /// set of rate-limit buckets until the old one expires. The new record
    /// copies the old one's settings (scopes, environment, limits, ...).
    Rotate(RotateArgs),
}

/// Arguments of `keys rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Id of the key to replace.
    id: String,
    /// How long the old key keeps working, e.g. `24h`, `30m`, `7d`.
    #[arg(long, default_value = "24h")]
    overlap: String,
    /// Id of the new key [default: `<consumer>-<UTC time>`].
    #[arg(long)]
    new_id: Option<String>,
    /// End the new key with a checksum (see `keys create --checksum`).
    #[arg(long)]
    checksum: bool,
    /// The key list file.
    #[arg(long, value_name = "KEYS.json")]
    file: PathBuf,
}

/// Arguments of `keys create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Key id: 1-128 visible ASCII characters, unique in the file.
    #[arg(long)]
    id: String,
    /// Key prefix, letters, digits, `_` and `-` [default: `sk_<environment>_`
    /// with --environment, else `sk_`]. Must match the filter's `key_prefixes`, if set.
    #[arg(long)]
    prefix: Option<String>,
    /// Scopes the key holds, comma-separated (the option may be repeated).
    #[arg(long, value_delimiter = ',', value_name = "SCOPE,...")]
    scopes: Vec<String>,
    /// Expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z); the key is refused from then on.
    #[arg(long, value_name = "RFC3339")]
    expires: Option<String>,
    /// Environment, e.g. `live` or `test` (usable in rules).
    #[arg(long)]
    environment: Option<String>,
    /// Free-form label for people.
    #[arg(long)]
    label: Option<String>,
    /// Characters in the random part (16-128).
    #[arg(long, default_value_t = keygen::RANDOM_CHARS)]
    length: usize,
    /// Alphabet of the random part.
    #[arg(long, value_enum, default_value_t = Alphabet::Base62)]
    alphabet: Alphabet,
    /// End the key with a checksum (six base62 characters of its CRC-32), as
    /// secret scanners and the filter's `key_checksum: "crc32"` check.
    #[arg(long)]
    checksum: bool,
    /// The key list file.
    #[arg(long, value_name = "KEYS.json")]
    file: PathBuf,
}

/// Arguments of `keys revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Id of the key.
    id: String,
    /// The key list file.
    #[arg(long, value_name = "KEYS.json")]
    file: PathBuf,
    /// Remove the record instead of disabling it.
    #[arg(long)]
    delete: bool,
}

/// Arguments of `keys list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The key list file.
    #[arg(long, value_name = "KEYS.json")]
    file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The usage file `keygate serve` keeps [default: beside --file,
    /// `keys.json` → `keys.usage.json`].
    #[arg(long, value_name = "USAGE.json")]
    usage: Option<PathBuf>,
}

/// Runs a `keys` subcommand.
pub fn run(command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::Create(args) => create(args),
        KeysCommand::Revoke(args) => revoke(args),
        KeysCommand::List(args) => list(args),
        KeysCommand::Rotate(args) => rotate(args),
    }
}

fn create(args: CreateArgs) -> Result<()> {
    let id_ok = !args.id.is_empty()
        && args.id.len() <= 128
        && args.id.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if !id_ok {
        return Err(Failure::new("--id: must be 1-128 visible ASCII characters"));
    }
    let prefix = match (&args.prefix, &args.environment) {
        (Some(p), _) => p.clone(),
        (None, Some(env)) => format!("sk_{env}_"),
        (None, None) => "sk_".to_string(),
    };
    keygen::check_prefix(&prefix).map_err(|e| Failure::because("--prefix", e))?;
    if !keygen::LENGTHS.contains(&args.length) {
        return Err(Failure::new(format!(
            "--length: {} is not between {} and {}",
            args.length,
            keygen::LENGTHS.start(),
            keygen::LENGTHS.end()
        )));
    }
    if let Some(t) = &args.expires {
        let at = OffsetDateTime::parse(t, &Rfc3339).map_err(|e| {
            Failure::new(format!(
                "--expires: {t:?} is not an RFC 3339 timestamp such as 2027-01-01T00:00:00Z ({e})"
            ))
        })?;
        if at.unix_timestamp() <= now_unix() {
            eprintln!("warning: --expires {t} is in the past: the key is created expired");
        }
    }
    let mut scopes: Vec<String> = Vec::new();
    for s in args
        .scopes
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        if !scopes.iter().any(|x| x == s) {
            scopes.push(s.to_string());
        }
    }

    let key = keygen::new_key(&prefix, args.length, args.alphabet, args.checksum)?;
    let record = KeyConfig {
        id: args.id.clone(),
        sha256: hex::encode(keygate_core::keys::digest(key.as_bytes())),
        scopes,
        expires_at: args.expires,
        label: args.label,
        environment: args.environment,
        display: Some(keygen::display(&prefix, &key)),
        ..KeyConfig::default()
    };
    let file = args.file.display().to_string();
    let version = keyfile::update(&args.file, true, |list| {
        if list.keys.iter().any(|k| k.id == record.id) {
            return Err(Failure::new(format!(
                "a key with id {:?} already exists in {file}",
                record.id
            )));
        }
        list.keys.push(record);
        Ok(true)
    })?;
    if let Err(e) = print_stdout(&format!("{key}\n")) {
        eprintln!(
            "warning: key {:?} was stored but could not be shown; delete it with: keygate keys revoke {} --delete --file {file}",
            args.id, args.id
        );
        return Err(e);
    }
    eprintln!(
        "created key {:?} in {file} (version {version}); it is shown only this once",
        args.id
    );
    Ok(())
}

fn revoke(args: RevokeArgs) -> Result<()> {
    let file = args.file.display().to_string();
    let mut already = false;
    let version = keyfile::update(&args.file, false, |list| {
        let Some(i) = list.keys.iter().position(|k| k.id == args.id) else {
            return Err(Failure::new(format!(
                "no key with id {:?} in {file}",
                args.id
            )));
        };
        if args.delete {
            list.keys.remove(i);
            return Ok(true);
        }
        let key = &mut list.keys[i];
        already = key.disabled && key.revoked_at.is_some();
        key.disabled = true;
        if key.revoked_at.is_none() {
            key.revoked_at = Some(now_rfc3339()?);
        }
        Ok(!already)
    })?;
    if already {
        eprintln!("key {:?} was already disabled; {file} unchanged", args.id);
    } else if args.delete {
        eprintln!("deleted key {:?} from {file} (version {version})", args.id);
    } else {
        eprintln!("disabled key {:?} in {file} (version {version})", args.id);
    }
    Ok(())
}

fn rotate(args: RotateArgs) -> Result<()> {
    let overlap_ms = keygate_core::duration::parse_duration_ms(&args.overlap)
        .filter(|ms| *ms <= 366 * 86_400_000)
        .ok_or_else(|| {
            Failure::new(format!(
                "--overlap: {:?} is not a duration up to 366d, e.g. 24h",
                args.overlap
            ))
        })?;
    let now = now_unix();
    let old_until =
        rfc3339(now.saturating_add(i64::try_from(overlap_ms / 1000).unwrap_or(i64::MAX)))?;
    let stamp = OffsetDateTime::from_unix_timestamp(now)
        .map(|t| {
            format!(
                "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .map_err(|e| Failure::because("cannot read the clock", e))?;
    let file = args.file.display().to_string();
    let mut issued: Option<(String, String)> = None;
    let version = keyfile::update(&args.file, false, |list| {
        let Some(i) = list.keys.iter().position(|k| k.id == args.id) else {
            return Err(Failure::new(format!(
                "no key with id {:?} in {file}",
                args.id
            )));
        };
        let old = &list.keys[i];
        if old.disabled || old.revoked_at.is_some() {
            return Err(Failure::new(format!(
                "key {:?} is revoked: create a new key instead",
                args.id
            )));
        }
        let consumer = old.consumer.clone().unwrap_or_else(|| old.id.clone());
        let new_id = args
            .new_id
            .clone()
            .unwrap_or_else(|| format!("{consumer}-{stamp}"));
        if list.keys.iter().any(|k| k.id == new_id) {
            return Err(Failure::new(format!(
                "a key with id {new_id:?} already exists in {file} (use --new-id)"
            )));
        }
        let prefix = old
            .display
            .as_deref()
            .and_then(|d| d.split_once('…'))
            .map_or("sk_", |(p, _)| p)
            .to_string();
        keygen::check_prefix(&prefix).map_err(|e| Failure::because("the old key's prefix", e))?;
        let key = keygen::new_key(
            &prefix,
            keygen::RANDOM_CHARS,
            Alphabet::Base62,
            args.checksum,
        )?;
        let new = KeyConfig {
            id: new_id.clone(),
            sha256: hex::encode(keygate_core::keys::digest(key.as_bytes())),
            display: Some(keygen::display(&prefix, &key)),
            consumer: Some(consumer.clone()),
            ..old.clone()
        };
        let old = &mut list.keys[i];
        old.consumer = Some(consumer);
        // The old key ends at the overlap, or earlier if it already did.
        let ends_sooner = old
            .expires_at
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .is_some_and(|t| {
                t.unix_timestamp() <= now + i64::try_from(overlap_ms / 1000).unwrap_or(i64::MAX)
            });
        if !ends_sooner {
            old.expires_at = Some(old_until.clone());
        }
        list.keys.push(new);
        issued = Some((new_id, key));
        Ok(true)
    })?;
    let Some((new_id, key)) = issued else {
        return Err(Failure::new("no key was issued"));
    };
    if let Err(e) = print_stdout(&format!("{key}\n")) {
        eprintln!(
            "warning: key {new_id:?} was stored but could not be shown; delete it with: keygate keys revoke {new_id} --delete --file {file}"
        );
        return Err(e);
    }
    eprintln!(
        "rotated {:?}: new key {new_id:?} in {file} (version {version}), shown only this once; {:?} works until {old_until}",
        args.id, args.id
    );
    Ok(())
}

fn list(args: ListArgs) -> Result<()> {
    let list = keyfile::read_existing(&args.file)?;
    let usage_file = args.usage.unwrap_or_else(|| usage::file_for(&args.file));
    let usage = UsageFile::load(&usage_file)?;
    let now = now_unix();
    let text = if args.json {
        json(&list, &usage, now)?
    } else {
        table(&list, &usage, now)
    };
    print_stdout(&text)
}

/// `active`, `disabled` or `expired`, as the filter would treat the key at `now`.
fn status(key: &KeyConfig, now: i64) -> &'static str {
    let expired = key
        .expires_at
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .is_some_and(|at| now >= at.unix_timestamp());
    if key.revoked_at.is_some() {
        "revoked"
    } else if key.disabled {
        "disabled"
    } else if expired {
        "expired"
    } else {
        "active"
    }
}

/// One row of `keys list --json`.
#[derive(Serialize)]
struct Row<'a> {
    id: &'a str,
    display: Option<&'a str>,
    scopes: &'a [String],
    environment: Option<&'a str>,
    expires_at: Option<&'a str>,
    label: Option<&'a str>,
    status: &'static str,
    /// RFC 3339, `null` when never reported.
    last_used: Option<String>,
    requests_24h: u64,
}

/// `keys list --json` output.
#[derive(Serialize)]
struct Listing<'a> {
    version: u64,
    keys: Vec<Row<'a>>,
}

/// A key's last use (RFC 3339) and its requests in the last 24 h.
fn usage_of(usage: &UsageFile, id: &str, now: i64) -> (Option<String>, u64) {
    usage
        .keys
        .get(id)
        .map_or((None, 0), |u| (rfc3339(u.last_used).ok(), u.last_24h(now)))
}

fn json(list: &KeyList, usage: &UsageFile, now: i64) -> Result<String> {
    let listing = Listing {
        version: list.version,
        keys: list
            .keys
            .iter()
            .map(|k| Row {
                id: &k.id,
                display: k.display.as_deref(),
                scopes: &k.scopes,
                environment: k.environment.as_deref(),
                expires_at: k.expires_at.as_deref(),
                label: k.label.as_deref(),
                status: status(k, now),
                last_used: usage_of(usage, &k.id, now).0,
                requests_24h: usage_of(usage, &k.id, now).1,
            })
            .collect(),
    };
    let mut text = serde_json::to_string_pretty(&listing)
        .map_err(|e| Failure::because("cannot serialize the list", e))?;
    text.push('\n');
    Ok(text)
}

fn table(list: &KeyList, usage: &UsageFile, now: i64) -> String {
    let header = [
        "ID",
        "KEY",
        "SCOPES",
        "ENV",
        "EXPIRES",
        "STATUS",
        "LAST USED",
        "24H",
        "LABEL",
    ];
    let mut rows: Vec<[String; 9]> = vec![header.map(String::from)];
    for k in &list.keys {
        let or_dash = |s: Option<&str>| s.map_or("-".to_string(), printable);
        let (last_used, day) = usage_of(usage, &k.id, now);
        rows.push([
            printable(&k.id),
            or_dash(k.display.as_deref()),
            if k.scopes.is_empty() {
                "-".to_string()
            } else {
                printable(&k.scopes.join(","))
            },
            or_dash(k.environment.as_deref()),
            k.expires_at
                .as_deref()
                .map_or("never".to_string(), printable),
            status(k, now).to_string(),
            last_used.unwrap_or_else(|| "never".to_string()),
            day.to_string(),
            or_dash(k.label.as_deref()),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `s` with control characters escaped, safe to print in a terminal table.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Now, as the RFC 3339 text `revoked_at` holds.
fn now_rfc3339() -> Result<String> {
    rfc3339(now_unix())
}

/// Unix seconds as RFC 3339 text.
fn rfc3339(unix: i64) -> Result<String> {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or_else(|| Failure::new("cannot format the time"))
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> KeyConfig {
        KeyConfig {
            id: id.into(),
            sha256: "00".repeat(32),
            ..KeyConfig::default()
        }
    }

    #[test]
    fn status_follows_the_filter() {
        let mut k = key("a");
        assert_eq!(status(&k, 0), "active");
        k.expires_at = Some("1970-01-01T00:01:40Z".into());
        assert_eq!(status(&k, 99), "active");
        assert_eq!(status(&k, 100), "expired");
        k.disabled = true;
        assert_eq!(status(&k, 100), "disabled");
        k.disabled = false;
        k.revoked_at = Some("2026-01-01T00:00:00Z".into());
        assert_eq!(status(&k, 100), "revoked", "a revocation is for good");
    }

    #[test]
    fn table_aligns_and_escapes() {
        let mut a = key("a");
        a.display = Some("sk_…abcd".into());
        a.scopes = vec!["read".into(), "write".into()];
        a.label = Some("bad\x1b[31m".into());
        let list = KeyList {
            version: 3,
            keys: vec![a, key("longer-id")],
        };
        let mut usage = UsageFile::default();
        usage.add_report(
            &keygate_core::usage::UsageReport {
                keys: vec![keygate_core::usage::ReportedKey {
                    id: "longer-id".into(),
                    requests: 12,
                    last_used: 1_800_000_000,
                }],
            },
            1_800_000_005,
        );
        let t = table(&list, &usage, 1_800_000_010);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "ID         KEY       SCOPES      ENV  EXPIRES  STATUS  LAST USED             24H  LABEL",
            "{t}"
        );
        assert_eq!(
            lines[1],
            "a          sk_…abcd  read,write  -    never    active  never                 0    bad\\u{1b}[31m",
            "{t}"
        );
        assert_eq!(
            lines[2],
            "longer-id  -         -           -    never    active  2027-01-15T08:00:00Z  12   -",
            "{t}"
        );
        assert!(!t.contains('\x1b'));
    }
}
