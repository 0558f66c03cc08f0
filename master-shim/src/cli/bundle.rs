//! Client bundles on the command line (`celld_trust::Bundle`, what `cellmaster admin-cert`
//! writes and every other command reads), `admin-cert` and `token create` themselves.

use std::path::Path;
use std::time::Duration;

use celld_proto::v1 as pb;
use celld_trust::{Bundle, ClientTls, MASTER_NAME, Role};

use super::{CliError, CliResult, Flags, failed, usage};

/// `--bundle`, else `$CELLMASTER_BUNDLE`; required unless `--insecure`.
pub fn client_tls(f: &Flags) -> Result<(Option<Bundle>, Option<ClientTls>), CliError> {
    if f.insecure {
        return Ok((None, None));
    }
    let env = std::env::var("CELLMASTER_BUNDLE").ok();
    let Some(path) = f.bundle.as_deref().or(env.as_deref()) else {
        return Err(usage(
            "no client bundle: give --bundle FILE or $CELLMASTER_BUNDLE (made by `cellmaster \
             admin-cert` on the master's host), or --insecure against a master that runs \
             without TLS",
        ));
    };
    let bundle = Bundle::read(Path::new(path)).map_err(|e| usage(format!("--bundle {e}")))?;
    let tls = bundle
        .client_tls(MASTER_NAME)
        .map_err(|e| usage(format!("--bundle {path}: {e}")))?;
    Ok((Some(bundle), Some(tls)))
}

/// A duration as `90s`, `30m`, `24h`, `7d` or plain seconds, within `range` seconds.
pub fn duration(
    flag: &str,
    text: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, CliError> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        "d" => Some(86400),
        _ => None,
    };
    digits
        .parse::<u64>()
        .ok()
        .zip(scale)
        .and_then(|(n, s)| n.checked_mul(s))
        .filter(|s| range.contains(s))
        .map(Duration::from_secs)
        .ok_or_else(|| {
            usage(format!(
                "{flag}: {text:?} is not a duration (90s, 30m, 24h, 7d) from {} s to {} s",
                range.start(),
                range.end()
            ))
        })
}

/// `cellmaster admin-cert --role R --out FILE [--name N] [--ttl D] [--state FILE]
/// [--master ADDR]`: on the master's host, with its CA key.
pub fn admin_cert(args: &[String]) -> CliResult {
    let f = Flags::parse(
        args,
        &["--role", "--out", "--name", "--ttl", "--state", "--master"],
        &[],
    )?;
    f.positional(&[])?;
    let role_text = f.get("--role").ok_or_else(|| usage("--role is required"))?;
    let role = Role::parse(role_text)
        .filter(|r| Role::FOR_PEOPLE.contains(r))
        .ok_or_else(|| {
            usage(format!(
                "--role: {role_text:?} is not one of reader, operator, admin"
            ))
        })?;
    let out = f.get("--out").ok_or_else(|| usage("--out is required"))?;
    let name = f.get("--name").unwrap_or(role.as_str());
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
        return Err(usage(format!(
            "--name: {name:?}: 1 to 64 printable characters"
        )));
    }
    let ttl = match f.get("--ttl") {
        Some(t) => duration("--ttl", t, 60..=5 * 365 * 86400)?,
        None => Duration::from_secs(365 * 86400),
    };
    let state_file = Path::new(f.get("--state").unwrap_or("/var/lib/cellmaster/state.db"));
    let state_dir = state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let ca = crate::trust::load_or_create_ca(state_dir).map_err(failed)?;
    let creds = crate::trust::person_bundle(&ca, role, name, ttl).map_err(failed)?;
    let bundle = Bundle {
        master: f.get("--master").unwrap_or("").to_string(),
        role: role.as_str().into(),
        ca: creds.ca_pem,
        cert: creds.cert_pem,
        key: creds.key_pem,
    };
    let text = bundle.to_toml().map_err(failed)?;
    crate::trust::write_private(Path::new(out), &text)
        .map_err(|e| failed(format!("--out {out}: {e}")))?;
    println!(
        "wrote {out}: role {role}, name {name:?}, valid {} days; CA fingerprint {}",
        ttl.as_secs() / 86400,
        ca.fingerprint()
    );
    Ok(())
}

/// `cellmaster token create --ttl D [--uses N] [--pxe]`.
pub async fn token(args: &[String]) -> CliResult {
    let f = Flags::parse(args, &["--master", "--ttl", "--uses"], &["--pxe"])?;
    let what = f.positional(&["create"])?;
    if what[0] != "create" {
        return Err(usage(format!("token {}: only `token create`", what[0])));
    }
    let ttl = duration(
        "--ttl",
        f.get("--ttl").ok_or_else(|| usage("--ttl is required"))?,
        1..=30 * 86400,
    )?;
    let uses = f.number("--uses", 1..=10_000, 1)?;
    let reply = f
        .master()
        .await?
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: ttl.as_secs() as u32,
            uses: uses as u32,
            pxe: f.has("--pxe"),
        })
        .await
        .map_err(super::from_status)?
        .into_inner();
    println!("{}", reply.token);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_name_the_flag_and_the_range() {
        assert_eq!(
            duration("--ttl", "90", 1..=100).unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            duration("--ttl", "2h", 1..=86400).unwrap(),
            Duration::from_secs(7200)
        );
        assert_eq!(
            duration("--ttl", "1d", 1..=86400).unwrap(),
            Duration::from_secs(86400)
        );
        for bad in ["", "h", "1w", "-1s", "2d", "99999999999999999999d"] {
            let e = duration("--ttl", bad, 1..=86400).unwrap_err();
            assert!(e.message.contains("--ttl"), "{bad}: {}", e.message);
        }
    }
}
