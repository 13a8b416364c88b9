#!/bin/sh
# Regenerates the Python modules of the plugin protocol and of RoadRunner's jobs RPC from proto/
# (committed, so that running mailpipe needs no protoc): src/mailpipe/plugins/external/proto/
# *_pb2.py and src/mailpipe/rpc/proto/jobs_pb2.py.
# Usage: scripts/gen_protos.sh [OUTPUT_DIR [RPC_OUTPUT_DIR]]   (the test writes to temporary
# dirs and compares)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/src/mailpipe/plugins/external/proto}
rpc_out=${2:-$root/src/mailpipe/rpc/proto}
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$root/proto"
"$python" -m grpc_tools.protoc -I. --python_out="$tmp" \
  mailpipe/plugin/v1/plugin.proto plugin/grpc_controller.proto plugin/grpc_stdio.proto \
  plugin/grpc_broker.proto roadrunner/jobs/v1/jobs.proto
mkdir -p "$out" "$rpc_out"
# One flat package: none of these modules imports another (empty_pb2 comes from protobuf).
cp "$tmp/mailpipe/plugin/v1/plugin_pb2.py" "$out/plugin_pb2.py"
for name in grpc_controller grpc_stdio grpc_broker; do
  cp "$tmp/plugin/${name}_pb2.py" "$out/${name}_pb2.py"
done
cp "$tmp/roadrunner/jobs/v1/jobs_pb2.py" "$rpc_out/jobs_pb2.py"
