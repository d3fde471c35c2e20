//! `keygate descriptor-set`: the protobuf descriptors of keygate's API, for tools that need
//! them as a file, such as Envoy's gRPC-JSON transcoder (`proto_descriptor`).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use prost::Message;
use prost_types::FileDescriptorSet;

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
/// sends (`BadRequest`), so a transcoder can print them as JSON.
pub fn descriptor_set() -> Vec<u8> {
    let mut merged = FileDescriptorSet::default();
    let mut defined = std::collections::HashSet::new();
    for encoded in [crate::proto::FILE_DESCRIPTOR_SET, tonic_types::pb::FILE_DESCRIPTOR_SET] {
        let set = FileDescriptorSet::decode(encoded).unwrap_or_default();
        for file in set.file {
            // tonic-types names its copy of google/rpc/status.proto `status.proto`: a file
            // that defines a type already defined is the same file under another name.
            let package = file.package().to_owned();
            let names: Vec<String> = file
                .message_type
                .iter()
                .map(|message| message.name())
                .chain(file.enum_type.iter().map(|enumeration| enumeration.name()))
                .map(|name| format!("{package}.{name}"))
                .collect();
            let known = merged.file.iter().any(|known| known.name == file.name);
            if known || names.iter().any(|name| defined.contains(name)) {
                continue;
            }
            defined.extend(names);
            merged.file.push(file);
        }
    }
    merged.encode_to_vec()
}

/// Writes [`descriptor_set`] to `--out` or standard output.
pub fn run(args: DescriptorSetArgs) -> Result<(), Failure> {
    let bytes = descriptor_set();
    match &args.out {
        Some(path) => std::fs::write(path, &bytes)
            .map_err(|error| Failure::usage(format!("cannot write {}: {error}", path.display()))),
        None => std::io::stdout()
            .write_all(&bytes)
            .map_err(|error| Failure::usage(format!("cannot write to standard output: {error}"))),
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
    }
}
