fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL: see src/codec.rs.
        .codec_path("crate::codec::QwenCodec")
        // For gRPC server reflection, so clients need no .proto files.
        .file_descriptor_set_path(out.join("qwen_descriptor.bin"))
        .compile_protos(&["proto/worker.proto", "proto/serve.proto"], &["proto"])?;
    Ok(())
}
