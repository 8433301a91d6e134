fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL: see src/codec.rs.
        .codec_path("crate::codec::QwenCodec")
        .compile_protos(&["proto/worker.proto"], &["proto"])?;
    Ok(())
}
