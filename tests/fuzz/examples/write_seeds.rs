//! Writes the seed corpus, `corpus/<target>/<name>`, from `celld_fuzz::seeds`; run it after
//! changing a seed or a request message: `cargo run --example write_seeds`.

fn main() -> std::io::Result<()> {
    for target in celld_fuzz::TARGETS {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => std::fs::create_dir_all(&dir)?,
        }
    }
    for seed in celld_fuzz::seeds::seeds() {
        let path = celld_fuzz::seeds::path(&seed);
        std::fs::write(&path, &seed.bytes)?;
        println!("{} ({} bytes)", path.display(), seed.bytes.len());
    }
    Ok(())
}
