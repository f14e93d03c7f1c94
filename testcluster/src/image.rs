//! Root file systems of the project's CPU images: the binaries, the shared libraries they link
//! (as `ldd` lists them, the dynamic loader included), the system's CA certificates, and an `/etc`
//! with the images' non-root user.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The system's CA certificates, as Debian's `ca-certificates` installs them.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The user the images run as (distroless' `nonroot`, as the chart and the worker pods expect).
pub const NONROOT: u32 = 65532;

/// The shared libraries `binary` loads, as absolute paths on this machine.
pub fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = std::process::Command::new("ldd").arg(binary).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // A static binary: "not a dynamic executable".
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            Some("not") => bail!("{}: a library is missing: {line}", binary.display()),
            _ => {}
        }
    }
    Ok(libs)
}

/// Builds the root of an image holding `binaries` in `/usr/local/bin` at `dest`.
pub fn build_root(dest: &Path, binaries: &[PathBuf]) -> anyhow::Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    let bin = dest.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    for binary in binaries {
        let name = binary.file_name().context("a binary's file name")?;
        std::fs::copy(binary, bin.join(name)).with_context(|| format!("copying {}", binary.display()))?;
        for lib in libraries(binary)? {
            let target = dest.join(lib.strip_prefix("/").expect("absolute"));
            std::fs::create_dir_all(target.parent().expect("a directory"))?;
            // Copy the file the link names, under the name the loader asks for.
            std::fs::copy(&lib, &target).with_context(|| format!("copying {}", lib.display()))?;
        }
    }
    let etc = dest.join("etc");
    std::fs::create_dir_all(etc.join("ssl/certs"))?;
    // TLS clients (object stores, the API server's CA aside) verify against the system roots.
    std::fs::copy(CA_BUNDLE, etc.join("ssl/certs/ca-certificates.crt"))
        .with_context(|| format!("copying {CA_BUNDLE} (Debian's ca-certificates)"))?;
    std::fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
        ),
    )?;
    std::fs::write(etc.join("group"), format!("root:x:0:\nnonroot:x:{NONROOT}:\n"))?;
    std::fs::create_dir_all(dest.join("home/nonroot"))?;
    std::fs::create_dir_all(dest.join("tmp"))?;
    Ok(())
}
