//! Compiles `proto/presence.proto` with a vendored protoc, so no system protoc is needed.

fn main() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/presence.proto");
    tonic_prost_build::configure().compile_protos(&["proto/presence.proto"], &["proto"])?;
    Ok(())
}
