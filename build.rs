//! Compiles the `atoms.session.v1` contract with protox (pure Rust, no system `protoc`) into
//! a file descriptor set, writes that set to `OUT_DIR` for server reflection, and generates the
//! tonic server and client code from it.

use std::path::PathBuf;

const PROTO_ROOT: &str = "proto";
const FILES: &[&str] = &[
    "atoms/session/v1/common.proto",
    "atoms/session/v1/session_service.proto",
    "atoms/session/v1/token_service.proto",
    "atoms/session/v1/revocation_service.proto",
    "atoms/session/v1/security_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let mut compiler = protox::Compiler::new([PROTO_ROOT])?;
    compiler.include_source_info(true).include_imports(true);
    for file in FILES {
        compiler.open_file(file)?;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("session_authority_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
