// A mailpipe plugin in Go, served with HashiCorp go-plugin (1.0.1 or later) over gRPC.
//
// Hooks: refuses recipients reject*@... (550 5.1.1), tempfails the sender tempfail@... (451 4.7.1)
// and adds the header X-Go-Plugin: yes at on_message_complete. Selector: the first healthy
// downstream. Build: `make plugins-go` (GOPATH mode, offline, from Debian's packages).
package main

import (
	"context"
	"encoding/json"
	"os"
	"strings"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "mailpipe/plugin/v1"
)

// Handshake must match mailpipe's (proto/mailpipe/plugin/v1/plugin.proto).
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "MAILPIPE_PLUGIN",
	MagicCookieValue: "d5a1c8e0-mailpipe-plugin-v1",
}

// hookContext is the part of the context JSON this plugin reads.
type hookContext struct {
	Hook        string                 `json:"hook"`
	SessionUUID string                 `json:"session_uuid"`
	Args        map[string]interface{} `json:"args"`
	Envelope    struct {
		MailFrom *string  `json:"mail_from"`
		RcptTo   []string `json:"rcpt_to"`
	} `json:"envelope"`
}

type hooks struct{ log hclog.Logger }

func (h *hooks) Implemented(context.Context, *pb.HooksRequest) (*pb.HooksResponse, error) {
	return &pb.HooksResponse{Hooks: []string{"on_mail_from", "on_rcpt_to", "on_message_complete"}}, nil
}

func (h *hooks) Call(_ context.Context, call *pb.HookCall) (*pb.HookResult, error) {
	var ctx hookContext
	if err := json.Unmarshal(call.ContextJson, &ctx); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "context_json: %v", err)
	}
	h.log.Info("hook called", "hook", call.Hook, "session", ctx.SessionUUID)
	switch call.Hook {
	case "on_mail_from":
		if sender, _ := ctx.Args["sender"].(string); strings.HasPrefix(strings.ToLower(sender), "tempfail@") {
			return &pb.HookResult{Action: pb.HookResult_TEMPFAIL, Code: 451, EnhancedCode: "4.7.1",
				Message: "Try again later (go plugin)"}, nil
		}
	case "on_rcpt_to":
		if rcpt, _ := ctx.Args["recipient"].(string); strings.HasPrefix(strings.ToLower(rcpt), "reject") {
			h.log.Warn("recipient refused", "recipient", rcpt)
			return &pb.HookResult{Action: pb.HookResult_REJECT, Code: 550, EnhancedCode: "5.1.1",
				Message: "No such user (go plugin)"}, nil
		}
	case "on_message_complete":
		mods, _ := json.Marshal(map[string]interface{}{"add_headers": [][2]string{{"X-Go-Plugin", "yes"}}})
		return &pb.HookResult{Action: pb.HookResult_MODIFY, ModificationsJson: mods}, nil
	}
	return &pb.HookResult{Action: pb.HookResult_CONTINUE}, nil
}

type selector struct{ log hclog.Logger }

func (s *selector) Select(_ context.Context, req *pb.SelectRequest) (*pb.SelectResponse, error) {
	for _, d := range req.Downstreams {
		if d.Healthy {
			return &pb.SelectResponse{Name: d.Name}, nil
		}
	}
	return nil, status.Error(codes.Unavailable, "no healthy downstream")
}

// The go-plugin glue: one GRPCPlugin per service, both on the same gRPC server.
type hooksPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	impl pb.HooksServer
}

func (p *hooksPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	pb.RegisterHooksServer(s, p.impl)
	return nil
}

func (p *hooksPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return pb.NewHooksClient(c), nil
}

type selectorPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	impl pb.SelectorServer
}

func (p *selectorPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	pb.RegisterSelectorServer(s, p.impl)
	return nil
}

func (p *selectorPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return pb.NewSelectorClient(c), nil
}

func main() {
	// Created before plugin.Serve, so it keeps the real stderr: go-plugin 1.0.1 points
	// os.Stderr at a pipe nobody reads once it serves. mailpipe reads these JSON lines.
	logger := hclog.New(&hclog.LoggerOptions{Name: "go-example", Level: hclog.Debug,
		Output: os.Stderr, JSONFormat: true})
	logger.Info("starting", "pid", os.Getpid())
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: Handshake,
		Plugins: map[string]plugin.Plugin{
			"hooks":    &hooksPlugin{impl: &hooks{log: logger}},
			"selector": &selectorPlugin{impl: &selector{log: logger}},
		},
		GRPCServer: plugin.DefaultGRPCServer,
		Logger:     logger,
	})
}
