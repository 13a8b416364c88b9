#!/bin/sh
# Builds the example Go plugin offline in GOPATH mode from Debian's packages (golang-go,
# golang-github-hashicorp-go-plugin-dev, golang-google-grpc-dev, golang-goprotobuf-dev,
# protobuf-compiler). Usage: build.sh OUTPUT_BINARY [BUILD_DIR]
# PLUGIN_SRC=DIR builds DIR/main.go instead of this folder's (e.g. benchmarks/noop_plugin);
# give each plugin its own BUILD_DIR, since the source is copied there.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
src=$(cd "${PLUGIN_SRC:-$here}" && pwd)
out=$1
build=${2:-$root/build/go-plugin}
mkdir -p "$build/src/mailpipe-go-plugin" "$build/cache" "$(dirname "$out")"
build=$(cd "$build" && pwd)  # GOPATH entries must be absolute
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
# The Go code of plugin.proto, made here (protoc-gen-go 1.3 with its grpc plugin), not committed.
protoc -I "$root/proto" --go_out=plugins=grpc:"$build/src" "$root/proto/mailpipe/plugin/v1/plugin.proto"
cp "$src/main.go" "$build/src/mailpipe-go-plugin/main.go"
cd "$build/src/mailpipe-go-plugin"
GOPATH="$build:/usr/share/gocode" GO111MODULE=off GOPROXY=off GOFLAGS= GOCACHE="$build/cache" \
  go build -o "$out" .
