//! OCI image archives without a container engine: an image's root file system (see
//! [`crate::image`]) becomes one gzip layer, with its configuration (user, entrypoint, environment),
//! its manifest and an index naming it by reference, in an OCI image layout packed as a tar archive
//! (what `skopeo copy oci-archive:...`, `podman load` and `crane push` read). The test kubelet runs
//! pods from such archives ([`unpack`]): the image a chart names is the image that was tested.
//!
//! The archive is reproducible: entries in name order, owned by root (the image user's home and
//! scratch directories by that user), with the modification time of `SOURCE_DATE_EPOCH` (0 when
//! unset), so the same binaries give the same digests.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use anyhow::{Context as _, bail};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder,
    ImageManifest, ImageManifestBuilder, MediaType, Os, RootFsBuilder, SCHEMA_VERSION, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

use crate::image::NONROOT;

/// The annotation that names an image in an index by its reference.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What an image runs.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The full reference, e.g. `ghcr.io/pretrain-dev/pretrain:0.1.0`.
    pub reference: String,
    /// The binaries, copied to `/usr/local/bin` with the libraries they load.
    pub binaries: Vec<PathBuf>,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
}

/// What [`build`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The archive.
    pub path: PathBuf,
    /// `sha256:...` of the manifest: the image's digest.
    pub digest: String,
}

/// Builds the image `spec` as an OCI archive at `out` (its root is assembled under `work`).
pub fn build(spec: &ImageSpec, work: &Path, out: &Path) -> anyhow::Result<Built> {
    let root = work.join("root");
    crate::image::build_root(&root, &spec.binaries)?;
    let epoch: u64 = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()).unwrap_or(0);

    // The layer: the root as a tar (its digest is the diff id), then gzipped (the blob's digest).
    let mut layer_tar = Vec::new();
    {
        let mut tar = tar::Builder::new(&mut layer_tar);
        tar.follow_symlinks(false);
        append_tree(&mut tar, &root, Path::new(""), epoch)?;
        tar.finish()?;
    }
    let diff_id = sha256(&layer_tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer_tar)?;
    let layer = gz.finish()?;

    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .user(format!("{NONROOT}:{NONROOT}"))
                .entrypoint(spec.entrypoint.clone())
                .env(vec![
                    "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
                    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_string(),
                ])
                .working_dir("/home/nonroot")
                .build()?,
        )
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(vec![format!("sha256:{diff_id}")]).build()?)
        .build()?;
    let config = serde_json::to_vec(&config)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config)?)
        .layers(vec![descriptor(MediaType::ImageLayerGzip, &layer)?])
        .build()?;
    let manifest = serde_json::to_vec(&manifest)?;
    let mut manifest_descriptor = descriptor(MediaType::ImageManifest, &manifest)?;
    manifest_descriptor.set_annotations(Some([(REF_NAME.to_string(), spec.reference.clone())].into()));
    let index = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_descriptor])
        .build()?;

    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut put = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(epoch);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data)?;
        Ok(())
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &serde_json::to_vec(&index)?)?;
    for blob in [&config, &manifest, &layer] {
        put(&format!("blobs/sha256/{}", sha256(blob)), blob)?;
    }
    tar.into_inner()?.flush()?;
    Ok(Built { path: out.to_path_buf(), digest: format!("sha256:{}", sha256(&manifest)) })
}

/// Unpacks the image `reference` of the OCI archive `archive` into `root`, checking every blob
/// against its digest; returns the image's entrypoint.
pub fn unpack(archive: &Path, reference: &str, root: &Path) -> anyhow::Result<Vec<String>> {
    let mut blobs = std::collections::BTreeMap::new();
    let file = std::fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    for entry in tar::Archive::new(file).entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        blobs.insert(name, data);
    }
    let read = |name: &str| blobs.get(name).with_context(|| format!("{}: no {name}", archive.display()));
    let blob = |d: &Descriptor| -> anyhow::Result<&Vec<u8>> {
        let hex = d.digest().digest();
        let data = read(&format!("blobs/sha256/{hex}"))?;
        if sha256(data) != hex || data.len() as u64 != d.size() {
            bail!("{}: blob {hex} does not match its digest or size", archive.display());
        }
        Ok(data)
    };
    let index: ImageIndex = serde_json::from_slice(read("index.json")?)?;
    let named = index
        .manifests()
        .iter()
        .find(|m| m.annotations().as_ref().and_then(|a| a.get(REF_NAME)).is_some_and(|r| r == reference))
        .with_context(|| format!("{}: no image {reference}", archive.display()))?;
    let manifest: ImageManifest = serde_json::from_slice(blob(named)?)?;
    let config: oci_spec::image::ImageConfiguration = serde_json::from_slice(blob(manifest.config())?)?;
    if root.exists() {
        std::fs::remove_dir_all(root)?;
    }
    std::fs::create_dir_all(root)?;
    for layer in manifest.layers() {
        let data = blob(layer)?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&data[..]));
        tar.set_preserve_permissions(true);
        tar.set_preserve_ownerships(true);
        tar.unpack(root).with_context(|| format!("unpacking {reference} into {}", root.display()))?;
    }
    Ok(config.config().as_ref().and_then(|c| c.entrypoint().clone()).unwrap_or_default())
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn descriptor(media_type: MediaType, data: &[u8]) -> anyhow::Result<Descriptor> {
    Ok(DescriptorBuilder::default()
        .media_type(media_type)
        .size(data.len() as u64)
        .digest(Sha256Digest::from_str(&sha256(data))?)
        .build()?)
}

/// Appends `dir` (as `prefix`) in name order: directories 0755, files with their mode, owned by
/// root except the image user's home and `/tmp` (1777).
fn append_tree<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    prefix: &Path,
    epoch: u64,
) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = prefix.join(entry.file_name());
        let meta = std::fs::symlink_metadata(entry.path())?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(epoch);
        let user = if path.starts_with("home/nonroot") { u64::from(NONROOT) } else { 0 };
        header.set_uid(user);
        header.set_gid(user);
        if meta.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(if path == Path::new("tmp") { 0o1777 } else { 0o755 });
            header.set_size(0);
            tar.append_data(&mut header, &path, std::io::empty())?;
            append_tree(tar, &entry.path(), &path, epoch)?;
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt as _;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(meta.permissions().mode() & 0o7777);
            header.set_size(meta.len());
            tar.append_data(&mut header, &path, std::fs::File::open(entry.path())?)?;
        } else {
            bail!("{}: only files and directories go into an image", entry.path().display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_unpacks_to_the_root_it_was_built_from_with_the_same_digest_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ImageSpec {
            reference: "registry.test/sh:1".into(),
            binaries: vec![PathBuf::from("/bin/sh")],
            entrypoint: vec!["sh".into()],
        };
        let first = build(&spec, &tmp.path().join("a"), &tmp.path().join("a.tar")).unwrap();
        let second = build(&spec, &tmp.path().join("b"), &tmp.path().join("b.tar")).unwrap();
        assert_eq!(first.digest, second.digest, "the same inputs give the same image");
        assert!(first.digest.starts_with("sha256:"));

        let root = tmp.path().join("root");
        let entrypoint = unpack(&first.path, "registry.test/sh:1", &root).unwrap();
        assert_eq!(entrypoint, ["sh"]);
        assert_eq!(std::fs::read(root.join("usr/local/bin/sh")).unwrap(), std::fs::read("/bin/sh").unwrap());
        assert!(std::fs::read_to_string(root.join("etc/passwd")).unwrap().contains("65532"));
        let err = unpack(&first.path, "registry.test/other:1", &root).unwrap_err();
        assert!(format!("{err}").contains("no image registry.test/other:1"), "{err}");
    }
}
