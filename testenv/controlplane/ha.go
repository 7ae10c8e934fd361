package main

// The highly available layout: three etcd members (fsync on), two API servers
// sharing credentials and one serving certificate from testenv's own CA.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"google.golang.org/grpc/grpclog"
)

const (
	haMarkerFile     = "ha"                 // present in an HA cluster's directory
	etcdClusterPorts = "etcd-cluster.ports" // "client0 peer0 client1 peer1 client2 peer2"
	haEtcdMembers    = 3
	haAPIServers     = 2
	caKeyFile        = "ca.key"
	servingCertFile  = "serving.crt" // for 127.0.0.1, ::1 and localhost, signed by ca.crt
	servingKeyFile   = "serving.key"
	lockFile         = ".controlplane.lock"
)

func isHA(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, haMarkerFile))
	return err == nil
}

func memberName(m int) string { return fmt.Sprintf("etcd-%d", m) }

// parseIndex parses a member or API server index in 0..n-1.
func parseIndex(s string, n int) (int, error) {
	i, err := strconv.Atoi(s)
	if err != nil || i < 0 || i >= n || strconv.Itoa(i) != s {
		return 0, fmt.Errorf("index %q is not in 0..%d", s, n-1)
	}
	return i, nil
}

// lockDir takes an exclusive lock on dir, for what concurrent processes create once.
func lockDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		_ = f.Close()
		return nil, err
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		_ = f.Close()
	}, nil
}

// ---------------------------------------------------------------- etcd members

func loopbackURL(port int) url.URL {
	return url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
}

// memberURLs splits the cluster's ports into client and peer URLs per member.
func memberURLs(ports []int) (clients, peers []url.URL) {
	for m := range haEtcdMembers {
		clients = append(clients, loopbackURL(ports[2*m]))
		peers = append(peers, loopbackURL(ports[2*m+1]))
	}
	return clients, peers
}

// etcdEndpoints returns the etcd client URLs: every member's in HA mode, the
// single etcd's otherwise.
func etcdEndpoints(dir string) ([]string, error) {
	if !isHA(dir) {
		endpoint, err := readTrimmed(filepath.Join(dir, etcdURLFile))
		if err != nil {
			return nil, fmt.Errorf("etcd is not running in %s: %v", dir, err)
		}
		return []string{endpoint}, nil
	}
	ports, err := readPorts(filepath.Join(dir, etcdClusterPorts), 2*haEtcdMembers)
	if err != nil {
		return nil, fmt.Errorf("no etcd members in %s: %v", dir, err)
	}
	clients, _ := memberURLs(ports)
	endpoints := make([]string, len(clients))
	for i, u := range clients {
		endpoints[i] = u.String()
	}
	return endpoints, nil
}

// runEtcdMember runs member m of the static three-member cluster, data in
// D/etcd-M, client URL in D/etcd-M.url once it serves. fsync stays on.
func runEtcdMember(dir string, m int) error {
	if m >= haEtcdMembers {
		return fmt.Errorf("--member must be 0..%d, not %d", haEtcdMembers-1, m)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return err
	}
	ports, err := stickyPorts(filepath.Join(dir, etcdClusterPorts), 2*haEtcdMembers)
	unlock()
	if err != nil {
		return err
	}
	clients, peers := memberURLs(ports)
	initial := make([]string, haEtcdMembers)
	for i := range haEtcdMembers {
		initial[i] = memberName(i) + "=" + peers[i].String()
	}

	cfg := embed.NewConfig()
	cfg.Name = memberName(m)
	cfg.Dir = filepath.Join(dir, memberName(m))
	cfg.ListenClientUrls = []url.URL{clients[m]}
	cfg.AdvertiseClientUrls = []url.URL{clients[m]}
	cfg.ListenPeerUrls = []url.URL{peers[m]}
	cfg.AdvertisePeerUrls = []url.URL{peers[m]}
	cfg.InitialCluster = strings.Join(initial, ",")
	cfg.InitialClusterToken = "testenv"
	cfg.ClusterState = embed.ClusterStateFlagNew // ignored once the data dir exists
	cfg.UnsafeNoFsync = false
	cfg.LogLevel = "warn"

	urlFile := filepath.Join(dir, memberName(m)+".url")
	if err := os.Remove(urlFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return serveEtcd(cfg, urlFile, clients[m])
}

func etcdMemberReady(dir string, m int) error {
	_, err := readTrimmed(filepath.Join(dir, memberName(m)+".url"))
	return err
}

// writeEtcdURL writes every member's client URL, comma-separated, to D/etcd.url.
func writeEtcdURL(dir string) error {
	endpoints, err := etcdEndpoints(dir)
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, etcdURLFile), []byte(strings.Join(endpoints, ",")+"\n"), 0o644)
}

// runEtcdLeader prints the index of the member that is leader: one that
// answers Status naming itself as the leader and then serves a linearizable
// read, which a leader cut off from the others cannot (it would only step down
// after an election timeout).
func runEtcdLeader(args []string) error {
	fs := flag.NewFlagSet("etcd-leader", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for a leader")
	dir, _, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if !isHA(dir) {
		return fmt.Errorf("%s is not an HA cluster", dir)
	}
	endpoints, err := etcdEndpoints(dir)
	if err != nil {
		return err
	}
	quietGRPC()
	clients := make([]*clientv3.Client, len(endpoints))
	for m, ep := range endpoints {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: time.Second, Logger: zap.NewNop()})
		if err != nil {
			return err
		}
		defer func() { _ = cli.Close() }()
		clients[m] = cli
	}
	isLeader := func(m int) bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		resp, err := clients[m].Status(ctx, endpoints[m])
		if err != nil || resp.Leader == 0 || resp.Leader != resp.Header.MemberId {
			return false
		}
		_, err = clients[m].Get(ctx, "etcd-leader-probe")
		return err == nil
	}
	deadline := time.Now().Add(*timeout)
	for {
		for m := range endpoints {
			if isLeader(m) {
				fmt.Println(m)
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no etcd member is leader after %s (a leader needs 2 of the 3 members running)", *timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// ---------------------------------------------------------------- certificates

// ensurePKI creates once a CA (D/ca.crt, D/ca.key) and a serving certificate
// signed by it (D/serving.crt, D/serving.key) for 127.0.0.1, ::1, localhost
// and the in-cluster names of the kubernetes Service.
func ensurePKI(dir string) error {
	all := true
	for _, f := range []string{caFile, caKeyFile, servingCertFile, servingKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			all = false
		}
	}
	if all {
		return nil
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          serialNumber(),
		Subject:               pkix.Name{CommonName: "lease-exec testenv CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	template := &x509.Certificate{
		SerialNumber: serialNumber(),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.IPv4(10, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, caCert, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	caKeyDER, err := x509.MarshalECPrivateKey(caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		typ  string
		der  []byte
		mode os.FileMode
	}{
		{caKeyFile, "EC PRIVATE KEY", caKeyDER, 0o600},
		{servingKeyFile, "EC PRIVATE KEY", keyDER, 0o600},
		{servingCertFile, "CERTIFICATE", der, 0o644},
		{caFile, "CERTIFICATE", caDER, 0o644},
	} {
		data := pem.EncodeToMemory(&pem.Block{Type: f.typ, Bytes: f.der})
		if err := writeFileAtomic(filepath.Join(dir, f.name), data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// quietGRPC drops gRPC's own log lines (dial failures to a stopped member),
// which would otherwise reach stderr through klog.
func quietGRPC() {
	grpclog.SetLoggerV2(grpclog.NewLoggerV2(io.Discard, io.Discard, io.Discard))
}

func serialNumber() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}

// readPorts reads n ports saved by stickyPorts.
func readPorts(path string, n int) ([]int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var ports []int
	for _, f := range strings.Fields(string(data)) {
		p, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		ports = append(ports, p)
	}
	if len(ports) != n {
		return nil, fmt.Errorf("%s holds %d ports, not %d", path, len(ports), n)
	}
	return ports, nil
}
