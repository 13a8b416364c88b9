// A no-op mailpipe plugin for benchmarks/plugins.py: it implements on_rcpt_to only and answers
// CONTINUE without reading the context, so a call costs only mailpipe's side and the gRPC round
// trip. Built like the example (GOPATH mode, offline, Debian's go-plugin 1.0.1):
// PLUGIN_SRC=benchmarks/noop_plugin examples/plugins/go/build.sh OUT BUILD_DIR.
package main

import (
	"context"
	"os"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	pb "mailpipe/plugin/v1"
)

// Handshake must match mailpipe's (proto/mailpipe/plugin/v1/plugin.proto).
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "MAILPIPE_PLUGIN",
	MagicCookieValue: "d5a1c8e0-mailpipe-plugin-v1",
}

type hooks struct{}

var continueResult = &pb.HookResult{Action: pb.HookResult_CONTINUE}

func (hooks) Implemented(context.Context, *pb.HooksRequest) (*pb.HooksResponse, error) {
	return &pb.HooksResponse{Hooks: []string{"on_rcpt_to"}}, nil
}

func (hooks) Call(context.Context, *pb.HookCall) (*pb.HookResult, error) {
	return continueResult, nil
}

type hooksPlugin struct {
	plugin.NetRPCUnsupportedPlugin
}

func (hooksPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	pb.RegisterHooksServer(s, hooks{})
	return nil
}

func (hooksPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return pb.NewHooksClient(c), nil
}

func main() {
	// Created before plugin.Serve, so it keeps the real stderr (see examples/plugins/go).
	logger := hclog.New(&hclog.LoggerOptions{Name: "noop", Level: hclog.Warn,
		Output: os.Stderr, JSONFormat: true})
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: Handshake,
		Plugins:         map[string]plugin.Plugin{"hooks": hooksPlugin{}},
		GRPCServer:      plugin.DefaultGRPCServer,
		Logger:          logger,
	})
}
