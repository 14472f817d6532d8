//! Running commands: every command is printed before it runs, and a failure
//! keeps the child's exit status so that `cargo xtask` can pass it on.

use std::{
    env,
    ffi::OsStr,
    fmt,
    os::unix::{fs::PermissionsExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output},
};

use anyhow::{Context, Result};

/// The workspace root (xtask sits one level below it).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
}

/// `cargo` (the rustup proxy on PATH, so toolchain overrides apply) run from
/// the workspace root, wherever `cargo xtask` was started.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// A command that ran and did not succeed.
#[derive(Debug)]
pub struct CommandFailed {
    pub command: String,
    pub status: ExitStatus,
}

impl CommandFailed {
    /// The exit code `cargo xtask` should end with: the child's own, or
    /// 128 + signal as a shell reports it.
    pub fn exit_code(&self) -> u8 {
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1),
            (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
            (None, None) => 1,
        }
    }
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.command, self.status)
    }
}

impl std::error::Error for CommandFailed {}

/// Prints `cmd`, runs it with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(CommandFailed {
            command: shown,
            status,
        }
        .into())
    }
}

/// Runs a quiet check and returns its stdout when it exits 0; `None` when it
/// cannot be started (not installed) or fails.
pub fn probe(cmd: &mut Command) -> Option<String> {
    match cmd.output() {
        Ok(Output { status, stdout, .. }) if status.success() => {
            Some(String::from_utf8_lossy(&stdout).into_owned())
        }
        _ => None,
    }
}

/// The command as a shell line, with the environment variables it sets.
pub fn display(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| format!("{}={}", key.to_string_lossy(), quote(value)))
    });
    let program = Some(quote(cmd.get_program()));
    let args = cmd.get_args().map(quote);
    envs.chain(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Whether we run as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Finds an executable on PATH, or in the sbin directories that a non-root
/// PATH often leaves out (`ip` lives in /usr/sbin on Debian).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The cargo target directory (honours `CARGO_TARGET_DIR` and `build.target-dir`).
pub fn target_dir() -> Result<PathBuf> {
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run `cargo metadata`")?;
    anyhow::ensure!(
        output.status.success(),
        "`cargo metadata` failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("cannot parse `cargo metadata` output")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` output has no target_directory")
}

/// The shared libraries (the dynamic loader included) in `ldd` output;
/// empty for a static binary.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim) {
        if line.contains("not a dynamic executable") || line.contains("statically linked") {
            return Ok(Vec::new());
        }
        if line.contains("=> not found") {
            anyhow::bail!("a shared library is not found: {line}");
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`,
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`, `linux-vdso.so.1 (0x...)`.
        let path = line
            .split_once("=>")
            .map_or(line, |(_, target)| target)
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The shared libraries `binary` loads (`ldd`, from libc-bin), to copy
/// with it into an image or an initramfs.
pub fn ldd(binary: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = Command::new("ldd");
    cmd.arg(binary);
    // ldd exits 1 on a static binary ("not a dynamic executable").
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}` (libc-bin)", display(&cmd)))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    parse_ldd(&text).with_context(|| format!("`{}`", display(&cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_a_shell_would_split() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--workspace", "it's here", ""])
            .env("CONN_TRACER_BIN", "/work/main/target/debug/conn-tracer");
        assert_eq!(
            display(&cmd),
            "CONN_TRACER_BIN=/work/main/target/debug/conn-tracer cargo test --workspace \
             'it'\\''s here' ''"
        );
    }

    #[test]
    fn exit_code_is_the_childs_or_128_plus_signal() {
        let failed = |status| CommandFailed {
            command: String::new(),
            status,
        };
        assert_eq!(failed(ExitStatus::from_raw(101 << 8)).exit_code(), 101);
        assert_eq!(failed(ExitStatus::from_raw(9)).exit_code(), 128 + 9);
    }

    #[test]
    fn ldd_gives_libraries_and_the_loader_not_the_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc3b5f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0e1c000000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0e1be00000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0e1c2a0000)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(
            parse_ldd("\tnot a dynamic executable\n")
                .unwrap()
                .is_empty()
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        let err = parse_ldd("\tlibbpf.so.1 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libbpf.so.1"), "{err}");
    }
}
