//! Generates the gRPC code for `proto/keygate/v1` and the file descriptor sets that server
//! reflection serves: keygate's own, and Envoy's ext_authz service (from the protos vendored in
//! `proto/vendor`; its code comes from the envoy-types crate). Uses the vendored protoc so a
//! fresh machine needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let protoc_for_env = protoc.clone();
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc_for_env) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos =
        ["proto/keygate/v1/types.proto", "proto/keygate/v1/key_admin.proto", "proto/keygate/v1/authorize.proto"];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("keygate_descriptor.bin"))
        // Messages that carry a full key get a hand-written Debug that redacts it.
        .skip_debug([
            ".keygate.v1.CheckRequest",
            ".keygate.v1.CreateKeyResponse",
            ".keygate.v1.RotateKeyResponse",
            ".keygate.v1.ImportedKey",
        ])
        // google.rpc.Status is tonic-types' own, so its error-details helpers work on it.
        .extern_path(".google.rpc", "::tonic_types::pb")
        .compile_protos(&protos, &["proto", "proto/vendor", well_known.to_str().ok_or("non-utf8 path")?])?;
    // Descriptors only: reflection (grpcurl list/describe) must know every service it serves.
    let status = std::process::Command::new(&protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out_dir.join("envoy_ext_authz_descriptor.bin").display()))
        .arg("-Iproto/vendor")
        .arg(format!("-I{}", well_known.display()))
        .arg("envoy/service/auth/v3/external_auth.proto")
        .status()?;
    if !status.success() {
        return Err("protoc could not build the ext_authz descriptor set".into());
    }
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
