// Command stargzd: the Go stargz snapshotter (Debian's containerd/stargz-snapshotter
// sources, packages fs/, fs/source and snapshot/) served as a containerd proxy snapshotter
// over a unix socket with containerd's snapshots gRPC service. Our own small main for
// the cold-start benchmark: upstream's service/ package needs cri-api, which Debian
// lacks. Registries are spoken to in plain HTTP (the benchmark's registry is loopback).
//
// Usage: stargzd -address SOCK -root DIR [-log-level info]
package main

import (
	"context"
	"flag"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/stargzd/stargzd.sock", "unix socket to serve on")
	root := flag.String("root", "/var/lib/stargzd", "state directory")
	level := flag.String("log-level", "info", "log level")
	flag.Parse()
	lvl, err := logrus.ParseLevel(*level)
	if err != nil {
		logrus.Fatalf("bad log level: %v", err)
	}
	logrus.SetLevel(lvl)
	ctx := context.Background()

	// fs/remote panics on a host whose Client has no Transport or Timeout.
	client := &http.Client{
		Transport: &http.Transport{
			Proxy:               nil,
			MaxIdleConns:        100,
			MaxIdleConnsPerHost: 100,
			IdleConnTimeout:     90 * time.Second,
		},
		Timeout: 60 * time.Second,
	}
	hosts := func(spec reference.Spec) ([]docker.RegistryHost, error) {
		return []docker.RegistryHost{{
			Client:       client,
			Host:         spec.Hostname(),
			Scheme:       "http",
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		}}, nil
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), config.Config{},
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)),
		stargzfs.WithOverlayOpaqueType(layer.OverlayOpaqueTrusted))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot configure the filesystem")
	}
	sn, err := snbase.NewSnapshotter(ctx, filepath.Join(*root, "snapshotter"), fs,
		snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot create the snapshotter")
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.G(ctx).WithError(err).Fatal("cannot create the socket directory")
	}
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot listen")
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		rpc.Stop()
	}()
	log.G(ctx).Infof("serving on %s", *address)
	if err := rpc.Serve(l); err != nil {
		log.G(ctx).WithError(err).Error("serve")
	}
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Error("close")
	}
}
