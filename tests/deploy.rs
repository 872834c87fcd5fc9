//! The deployment files are checked by the tools that will read them: the systemd unit by
//! `systemd-analyze verify` and `systemd-analyze security` (`.ci/run` installs systemd).

use std::path::Path;
use std::process::Command;

fn unit_with_this_binary(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("systemd/unpart.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/unpart -d -c /etc/unpart/unpart.yaml"));
    // verify checks that the programs exist: point them at the binary under test.
    let text = text.replace("/usr/local/bin/unpart", env!("CARGO_BIN_EXE_unpart"));
    std::fs::create_dir_all(dir).unwrap();
    let unit = dir.join("unpart.service");
    std::fs::write(&unit, text).unwrap();
    unit
}

fn analyze(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("systemd-analyze").args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let dir = std::env::temp_dir().join(format!("unpart-unit-{}", std::process::id()));
    let unit = unit_with_this_binary(&dir);
    let unit = unit.to_str().unwrap();
    let Some((ok, text)) = analyze(&["verify", unit]) else {
        // .ci/run installs systemd; a developer machine without it skips, loudly.
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(
        !text.contains("unpart.service:"),
        "verify warned about the unit:\n{text}"
    );
    let (_, text) = analyze(&["security", "--offline=true", unit]).unwrap();
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for unpart.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    // README states the score; 10 is "UNSAFE", below 2 is rated OK.
    assert!(score <= 1.5, "exposure {score}:\n{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
