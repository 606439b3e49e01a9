// etcd for the cluster tests: one member on loopback, started through etcd's
// embed package so that it builds from the same module as the control plane.
// It prints "etcd ready" once it serves clients and stops on SIGTERM/SIGINT.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
)

func mustURL(flagName, raw string) url.URL {
	u, err := url.Parse(raw)
	if err != nil {
		log.Fatalf("--%s: %v", flagName, err)
	}
	return *u
}

func main() {
	dir := flag.String("data-dir", "", "directory for etcd's data (required)")
	client := flag.String("listen-client-url", "http://127.0.0.1:2379", "URL that serves clients")
	peer := flag.String("listen-peer-url", "http://127.0.0.1:2380", "URL that serves peers")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "etcd: --data-dir is required")
		os.Exit(2)
	}

	cfg := embed.NewConfig()
	cfg.Dir = *dir
	cfg.LogLevel = "error"
	clientURL, peerURL := mustURL("listen-client-url", *client), mustURL("listen-peer-url", *peer)
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{clientURL}, []url.URL{clientURL}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peerURL}, []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	// A test cluster lives for minutes on a throwaway directory: no fsync.
	cfg.UnsafeNoFsync = true

	server, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcd: %v", err)
	}
	defer server.Close()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-server.Server.ReadyNotify():
		fmt.Println("etcd ready")
	case err := <-server.Err():
		log.Fatalf("etcd: %v", err)
	case <-stop:
		return
	}
	select {
	case err := <-server.Err():
		log.Fatalf("etcd: %v", err)
	case <-stop:
	}
}
