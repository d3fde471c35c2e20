//! `keygate descriptor-set`: the protobuf descriptors of keygate's API, for tools that need
//! them as a file, such as Envoy's gRPC-JSON transcoder (`proto_descriptor`).

use std::path::PathBuf;

use clap::Args;
use prost::Message;

use super::Failure;

/// Flags of `keygate descriptor-set`.
#[derive(Clone, Debug, Args)]
#[command(after_help = "Example:\n  keygate descriptor-set --out /etc/envoy/keygate.pb")]
pub struct DescriptorSetArgs {
    /// Where to write it; standard output when unset.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The encoded `FileDescriptorSet` of `keygate.v1` with everything it imports (the
/// `google.api.http` annotations, `google.rpc.Status`) and the `google.rpc` error details keygate
/// sends (`BadRequest`), so a transcoder can route HTTP/JSON to every RPC and print its errors.
///
/// Each file's bytes are copied as protoc wrote them: decoding into `prost_types` and encoding
/// again would drop every option that is an extension, such as `(google.api.http)`.
pub fn descriptor_set() -> Vec<u8> {
    let mut merged = Vec::new();
    let (mut names, mut defined) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    for encoded in [crate::proto::FILE_DESCRIPTOR_SET, tonic_types::pb::FILE_DESCRIPTOR_SET] {
        let mut rest: &[u8] = encoded;
        while !rest.is_empty() {
            let entry = rest;
            // Field 1, length-delimited: the only field of a FileDescriptorSet.
            let (Ok(10), Ok(length)) =
                (prost::encoding::decode_varint(&mut rest), prost::encoding::decode_varint(&mut rest))
            else {
                break;
            };
            let Some((raw, after)) = rest.split_at_checked(length as usize) else { break };
            rest = after;
            let entry = &entry[..entry.len() - rest.len()];
            let Ok(file) = prost_types::FileDescriptorProto::decode(raw) else { continue };
            // tonic-types names its copy of google/rpc/status.proto `status.proto`: a file that
            // defines a type already defined is the same file under another name.
            let package = file.package().to_owned();
            let types: Vec<String> = file
                .message_type
                .iter()
                .map(|message| message.name())
                .chain(file.enum_type.iter().map(|enumeration| enumeration.name()))
                .map(|name| format!("{package}.{name}"))
                .collect();
            if !names.insert(file.name().to_owned()) || types.iter().any(|name| defined.contains(name)) {
                continue;
            }
            defined.extend(types);
            merged.extend_from_slice(entry);
        }
    }
    merged
}

/// Writes [`descriptor_set`] to `--out` or standard output.
pub fn run(args: DescriptorSetArgs) -> Result<(), Failure> {
    let bytes = descriptor_set();
    match &args.out {
        Some(path) => std::fs::write(path, &bytes)
            .map_err(|error| Failure::usage(format!("cannot write {}: {error}", path.display()))),
        None => super::render::print_bytes(&bytes),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_set_is_one_consistent_pool_with_the_error_details() {
        let pool = prost_reflect::DescriptorPool::decode(super::descriptor_set().as_slice()).unwrap();
        for name in
            ["keygate.v1.CreateKeyRequest", "keygate.v1.CheckResponse", "google.rpc.Status", "google.rpc.BadRequest"]
        {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
        assert!(pool.get_service_by_name("keygate.v1.KeyAdmin").is_some());
        // The HTTP rules of the RPCs survive (a re-encoded set would have lost them).
        let text = String::from_utf8_lossy(&super::descriptor_set()).into_owned();
        for path in ["/v1/check", "/v1/tenants/{tenant_id}/keys", "/v1/tenants/{tenant_id}/keys/{key_id}:revoke"] {
            assert!(text.contains(path), "{path}");
        }
    }
}
