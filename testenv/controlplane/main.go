// Command controlplane runs a local Kubernetes control plane for tests: an
// embedded etcd, a real kube-apiserver and, optionally, a kube-controller-manager
// that runs only the garbage collector. Each runs as its own process of this
// program, so the API server can be stopped and started again while etcd keeps
// its data:
//
//	controlplane etcd --dir D                 # etcd, data in D/etcd, URL in D/etcd.url
//	controlplane apiserver --dir D [-- --flag=value ...]
//	controlplane controller-manager --dir D [-- --flag=value ...]
//	controlplane wait --dir D --for etcd|apiserver [--pid P ...] [--timeout 60s]
//	controlplane compact --dir D              # compact etcd to its current revision
//
// "wait --for apiserver" waits for /readyz and writes D/kubeconfig (admin),
// D/user-kubeconfig and D/user-token (a user with no rights) and D/ca.crt.
//
// The highly available layout (see ha.go and toxi.go) runs three etcd members,
// two API servers and a Toxiproxy server, each its own process:
//
//	controlplane etcd --dir D --member M       # member M of 3, data in D/etcd-M
//	controlplane apiserver --dir D --index N [-- --flag=value ...]
//	controlplane toxiproxy --dir D             # API port in D/toxiproxy.port
//	controlplane wait --dir D --for etcd-M|apiserver-N|toxiproxy
//	controlplane etcd-leader --dir D           # prints the leader member's index
//	controlplane proxy --dir D --name NAME --apiserver N
//	controlplane toxic --dir D --name NAME --kind partition|half-open|reset|latency|heal [--ms MS]
//	controlplane etcd-toxic --dir D --apiserver N --kind partition|half-open|reset|latency|heal [--ms MS]
//
// In the HA layout each API server reaches the etcd members through Toxiproxy
// proxies of its own (apiserver-N-etcd-M), so etcd-toxic can make one API
// server's watch cache lag behind etcd, or cut it off etcd, alone.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
	_ "time/tzdata" // CronJob time zones, as in the upstream kube-apiserver

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

// Files in the state directory.
const (
	etcdDataDir     = "etcd"
	etcdURLFile     = "etcd.url"       // client URL, written once etcd is ready
	etcdPortsFile   = "etcd.ports"     // "client peer", kept so a restart reuses them
	apiPortFile     = "apiserver.port" // kept so a restarted API server uses the same port
	apiArgsFile     = "apiserver.args" // extra flags given at first start, reused on restart
	kcmArgsFile     = "controller-manager.args"
	certDir         = "apiserver-certs" // kube-apiserver writes apiserver.crt/.key here
	saKeyFile       = "sa.key"          // service-account signing and verification key
	tokenFile       = "tokens.csv"
	adminTokenFile  = "admin-token"
	userTokenFile   = "user-token"
	caFile          = "ca.crt"
	kubeconfigFile  = "kubeconfig"
	userKubeconfig  = "user-kubeconfig"
	adminUser       = "admin"
	noRightsUser    = "user"
	saIssuer        = "https://kubernetes.default.svc.cluster.local"
	serviceIPRange  = "10.0.0.0/24"
	defaultDeadline = 60 * time.Second
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	sub, args := os.Args[1], os.Args[2:]
	var err error
	switch sub {
	case "etcd":
		err = runEtcd(args)
	case "apiserver":
		os.Exit(runAPIServer(args))
	case "controller-manager":
		os.Exit(runControllerManager(args))
	case "wait":
		err = runWait(args)
	case "compact":
		err = runCompact(args)
	case "etcd-leader":
		err = runEtcdLeader(args)
	case "toxiproxy":
		err = runToxiproxy(args)
	case "proxy":
		err = runProxy(args)
	case "toxic":
		err = runToxic(args)
	case "etcd-toxic":
		err = runEtcdToxic(args)
	case "-h", "--help", "help":
		usage()
	default:
		err = fmt.Errorf("unknown subcommand %q (etcd, apiserver, controller-manager, wait, compact, etcd-leader, toxiproxy, proxy, toxic, etcd-toxic)", sub)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "controlplane %s: %v\n", sub, err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: controlplane etcd|apiserver|controller-manager|wait|compact|etcd-leader|toxiproxy|proxy|toxic|etcd-toxic --dir DIR [options] [-- component flags]")
	os.Exit(2)
}

// parseFlags parses "--dir D ..." and returns the args after "--".
func parseFlags(fs *flag.FlagSet, args []string) (dir string, rest []string, err error) {
	fs.StringVar(&dir, "dir", "", "state directory (required)")
	if err := fs.Parse(args); err != nil {
		return "", nil, err
	}
	if dir == "" {
		return "", nil, errors.New("--dir is required")
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return "", nil, err
	}
	return dir, fs.Args(), nil
}

// ---------------------------------------------------------------- etcd

func runEtcd(args []string) error {
	fs := flag.NewFlagSet("etcd", flag.ContinueOnError)
	member := fs.Int("member", -1, "HA mode: this member's index (0..2)")
	dir, _, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if *member >= 0 {
		return runEtcdMember(dir, *member)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	ports, err := stickyPorts(filepath.Join(dir, etcdPortsFile), 2)
	if err != nil {
		return err
	}
	clientURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))}
	peerURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1]))}

	cfg := embed.NewConfig()
	cfg.Name = "testenv"
	cfg.Dir = filepath.Join(dir, etcdDataDir)
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = true
	cfg.LogLevel = "warn"

	return serveEtcd(cfg, filepath.Join(dir, etcdURLFile), clientURL)
}

// serveEtcd starts etcd, writes its client URL to urlFile once it is ready and
// serves until SIGTERM or SIGINT.
func serveEtcd(cfg *embed.Config, urlFile string, clientURL url.URL) error {
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		return err
	case <-time.After(defaultDeadline):
		return errors.New("etcd did not become ready within 60s")
	}
	if err := writeFileAtomic(urlFile, []byte(clientURL.String()+"\n"), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "etcd ready at %s (data in %s)\n", clientURL.String(), cfg.Dir)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	select {
	case <-ctx.Done():
		fmt.Fprintln(os.Stderr, "etcd stopping")
		return nil
	case err := <-e.Err():
		return err
	}
}

func runCompact(args []string) error {
	fs := flag.NewFlagSet("compact", flag.ContinueOnError)
	dir, _, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	endpoints, err := etcdEndpoints(dir)
	if err != nil {
		return err
	}
	quietGRPC()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return err
	}
	defer func() { _ = cli.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Any read returns the store's current revision in its header.
	resp, err := cli.Get(ctx, "compact-revision-probe")
	if err != nil {
		return err
	}
	rev := resp.Header.Revision
	if _, err := cli.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil {
		return err
	}
	fmt.Printf("compacted etcd to revision %d\n", rev)
	return nil
}

// ---------------------------------------------------------------- kube-apiserver

// apiServerFlags are the kube-apiserver flags, every default in one place.
func apiServerFlags(l apiLayout, port int, etcdServers string) map[string]string {
	dir := l.dir
	flags := map[string]string{
		"advertise-address":                "127.0.0.1",
		"bind-address":                     "127.0.0.1",
		"secure-port":                      strconv.Itoa(port),
		"cert-dir":                         filepath.Join(l.state, certDir),
		"etcd-servers":                     etcdServers,
		"service-cluster-ip-range":         serviceIPRange,
		"service-account-issuer":           saIssuer,
		"service-account-key-file":         filepath.Join(dir, saKeyFile),
		"service-account-signing-key-file": filepath.Join(dir, saKeyFile),
		"token-auth-file":                  filepath.Join(dir, tokenFile),
		"authorization-mode":               "RBAC",
		// No controller creates the "default" ServiceAccount of each
		// namespace, so Pods could not be created with this plugin on.
		"disable-admission-plugins": "ServiceAccount",
		// The "kubernetes" Service cannot point at a loopback address.
		"endpoint-reconciler-type": "none",
		"allow-privileged":         "true",
	}
	if l.ha() {
		// One serving certificate from testenv's CA (D/ca.crt) for both API
		// servers, valid for 127.0.0.1 on any port (so behind a proxy too).
		flags["tls-cert-file"] = filepath.Join(dir, servingCertFile)
		flags["tls-private-key-file"] = filepath.Join(dir, servingKeyFile)
		// spec.strategy and spec.preferredHolder kept, so that planned
		// handovers (lease-exec --handover) can be tested under faults.
		flags["feature-gates"] = "CoordinatedLeaderElection=true"
		flags["runtime-config"] = "coordination.k8s.io/v1beta1=true"
	}
	return flags
}

// apiLayout tells where one API server keeps its state: the cluster directory
// itself for the single API server, D/apiserver-N for API server N in HA mode.
type apiLayout struct {
	dir   string // the cluster directory
	state string // this API server's port, args and certificate directory
	index int    // -1 for the single API server
}

func newAPILayout(dir string, index int) apiLayout {
	if index < 0 {
		return apiLayout{dir: dir, state: dir, index: -1}
	}
	return apiLayout{dir: dir, state: filepath.Join(dir, fmt.Sprintf("apiserver-%d", index)), index: index}
}

func (l apiLayout) ha() bool         { return l.index >= 0 }
func (l apiLayout) portFile() string { return filepath.Join(l.state, apiPortFile) }
func (l apiLayout) argsFile() string { return filepath.Join(l.state, apiArgsFile) }

// caPEM returns the CA that verifies this API server's serving certificate.
func (l apiLayout) caPEM() ([]byte, error) {
	if l.ha() {
		return os.ReadFile(filepath.Join(l.dir, caFile))
	}
	return os.ReadFile(filepath.Join(l.dir, certDir, "apiserver.crt"))
}

func runAPIServer(args []string) int {
	fs := flag.NewFlagSet("apiserver", flag.ContinueOnError)
	index := fs.Int("index", -1, "HA mode: this API server's index (0 or 1)")
	dir, extra, err := parseFlags(fs, args)
	if err == nil {
		args, err = prepareAPIServer(dir, *index, extra)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "controlplane apiserver: %v\n", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "kube-apiserver %s\n", strings.Join(args, " "))
	cmd := apiserver.NewAPIServerCommand()
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

func prepareAPIServer(dir string, index int, extra []string) ([]string, error) {
	if index >= haAPIServers {
		return nil, fmt.Errorf("--index must be 0..%d, not %d", haAPIServers-1, index)
	}
	l := newAPILayout(dir, index)
	var etcdServers string
	if l.ha() {
		if !isHA(dir) {
			return nil, fmt.Errorf("%s is not an HA cluster (no %s file)", dir, haMarkerFile)
		}
		endpoints, err := etcdEndpoints(dir)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(l.state, 0o755); err != nil {
			return nil, err
		}
		proxied, err := etcdThroughProxies(dir, l, endpoints)
		if err != nil {
			return nil, fmt.Errorf("the way to etcd: %v", err)
		}
		etcdServers = strings.Join(proxied, ",")
	} else {
		etcdURL, err := readTrimmed(filepath.Join(dir, etcdURLFile))
		if err != nil {
			return nil, fmt.Errorf("etcd is not running in %s: %v", dir, err)
		}
		etcdServers = etcdURL
	}
	if l.ha() {
		// Both HA API servers start at once and share the credentials.
		unlock, err := lockDir(dir)
		if err != nil {
			return nil, err
		}
		defer unlock()
	}
	ports, err := stickyPorts(l.portFile(), 1)
	if err != nil {
		return nil, err
	}
	if err := ensureCredentials(dir); err != nil {
		return nil, err
	}
	if l.ha() {
		if err := ensurePKI(dir); err != nil {
			return nil, err
		}
	}
	extra, err = stickyArgs(l.argsFile(), extra)
	if err != nil {
		return nil, err
	}
	return mergeFlags(apiServerFlags(l, ports[0], etcdServers), extra)
}

// ensureCredentials creates the service-account key and the static tokens once.
func ensureCredentials(dir string) error {
	keyPath := filepath.Join(dir, saKeyFile)
	if _, err := os.Stat(keyPath); errors.Is(err, os.ErrNotExist) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return err
		}
		der := x509.MarshalPKCS1PrivateKey(key)
		if err := writeFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return err
		}
	}
	tokensPath := filepath.Join(dir, tokenFile)
	if _, err := os.Stat(tokensPath); errors.Is(err, os.ErrNotExist) {
		admin, user := randomToken(), randomToken()
		csv := fmt.Sprintf("%s,%s,%s-uid,\"system:masters\"\n%s,%s,%s-uid\n", admin, adminUser, adminUser, user, noRightsUser, noRightsUser)
		if err := writeFileAtomic(filepath.Join(dir, adminTokenFile), []byte(admin+"\n"), 0o600); err != nil {
			return err
		}
		if err := writeFileAtomic(filepath.Join(dir, userTokenFile), []byte(user+"\n"), 0o600); err != nil {
			return err
		}
		if err := writeFileAtomic(tokensPath, []byte(csv), 0o600); err != nil {
			return err
		}
	}
	return nil
}

func randomToken() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// ---------------------------------------------------------------- kube-controller-manager

func controllerManagerFlags(dir string) map[string]string {
	kubeconfig := filepath.Join(dir, kubeconfigFile)
	return map[string]string{
		"kubeconfig":                kubeconfig,
		"authentication-kubeconfig": kubeconfig,
		"authorization-kubeconfig":  kubeconfig,
		"controllers":               "garbagecollector",
		"leader-elect":              "false",
		"secure-port":               "0",
	}
}

func runControllerManager(args []string) int {
	fs := flag.NewFlagSet("controller-manager", flag.ContinueOnError)
	dir, extra, err := parseFlags(fs, args)
	if err == nil {
		if _, err = os.Stat(filepath.Join(dir, kubeconfigFile)); err != nil {
			err = fmt.Errorf("no kubeconfig in %s (run \"controlplane wait --for apiserver\" first): %v", dir, err)
		}
	}
	if err == nil {
		extra, err = stickyArgs(filepath.Join(dir, kcmArgsFile), extra)
	}
	if err == nil {
		args, err = mergeFlags(controllerManagerFlags(dir), extra)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "controlplane controller-manager: %v\n", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "kube-controller-manager %s\n", strings.Join(args, " "))
	cmd := controllermanager.NewControllerManagerCommand()
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

// ---------------------------------------------------------------- wait

func runWait(args []string) error {
	fs := flag.NewFlagSet("wait", flag.ContinueOnError)
	what := fs.String("for", "apiserver", "etcd, apiserver, etcd-M, apiserver-N or toxiproxy")
	var pids []int
	fs.Func("pid", "fail at once if this process exits (repeatable: the first is the one waited for)", func(v string) error {
		p, err := strconv.Atoi(v)
		if err != nil || p <= 0 {
			return fmt.Errorf("not a process id: %q", v)
		}
		pids = append(pids, p)
		return nil
	})
	timeout := fs.Duration("timeout", defaultDeadline, "deadline")
	dir, _, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(*timeout)
	var check func() error
	var done func() error
	switch {
	case *what == "etcd":
		check = func() error {
			_, err := readTrimmed(filepath.Join(dir, etcdURLFile))
			return err
		}
	case *what == "apiserver":
		l := newAPILayout(dir, -1)
		check = func() error { return apiServerReady(l) }
		done = func() error { return writeKubeconfigs(l) }
	case *what == "toxiproxy":
		check = func() error { return toxiproxyReady(dir) }
	case strings.HasPrefix(*what, "etcd-"):
		m, err := parseIndex(strings.TrimPrefix(*what, "etcd-"), haEtcdMembers)
		if err != nil {
			return fmt.Errorf("--for %s: %v", *what, err)
		}
		check = func() error { return etcdMemberReady(dir, m) }
		done = func() error { return writeEtcdURL(dir) }
	case strings.HasPrefix(*what, "apiserver-"):
		n, err := parseIndex(strings.TrimPrefix(*what, "apiserver-"), haAPIServers)
		if err != nil {
			return fmt.Errorf("--for %s: %v", *what, err)
		}
		l := newAPILayout(dir, n)
		check = func() error { return apiServerReady(l) }
		done = func() error { return writeKubeconfigs(l) }
	default:
		return fmt.Errorf("--for must be etcd, apiserver, etcd-M, apiserver-N or toxiproxy, not %q", *what)
	}
	for {
		err := check()
		if err == nil {
			break
		}
		for i, p := range pids {
			if alive(p) {
				continue
			}
			if i == 0 {
				return fmt.Errorf("%s exited before it was ready", *what)
			}
			return fmt.Errorf("process %d exited before %s was ready", p, *what)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %v", *what, *timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if done != nil {
		return done()
	}
	return nil
}

// apiServerReady asks /readyz with the admin token, trusting the CA of the
// API server's serving certificate.
func apiServerReady(l apiLayout) error {
	port, err := readTrimmed(l.portFile())
	if err != nil {
		return err
	}
	token, err := readTrimmed(filepath.Join(l.dir, adminTokenFile))
	if err != nil {
		return err
	}
	ca, err := l.caPEM()
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return errors.New("the CA file holds no certificate yet")
	}
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	defer client.CloseIdleConnections()
	req, err := http.NewRequest(http.MethodGet, "https://127.0.0.1:"+port+"/readyz", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/readyz: %s", resp.Status)
	}
	return nil
}

// writeKubeconfigs writes the admin's and the no-rights user's kubeconfigs for
// one API server: D/kubeconfig, D/user-kubeconfig and D/ca.crt for the single
// one; D/apiserver-N/kubeconfig and D/apiserver-N/user-kubeconfig in HA mode,
// and for API server 0 also D/kubeconfig, D/user-kubeconfig and D/apiserver.port.
func writeKubeconfigs(l apiLayout) error {
	port, err := readTrimmed(l.portFile())
	if err != nil {
		return err
	}
	ca, err := l.caPEM()
	if err != nil {
		return err
	}
	dirs := []string{l.dir}
	if l.ha() {
		dirs = []string{l.state}
		if l.index == 0 {
			dirs = append(dirs, l.dir)
		}
	} else if err := writeFileAtomic(filepath.Join(l.dir, caFile), ca, 0o644); err != nil {
		return err
	}
	server := "https://127.0.0.1:" + port
	for _, d := range dirs {
		if err := writeKubeconfig(filepath.Join(d, kubeconfigFile), server, ca, filepath.Join(l.dir, adminTokenFile), adminUser); err != nil {
			return err
		}
		if err := writeKubeconfig(filepath.Join(d, userKubeconfig), server, ca, filepath.Join(l.dir, userTokenFile), noRightsUser); err != nil {
			return err
		}
	}
	if l.ha() && l.index == 0 {
		return writeFileAtomic(filepath.Join(l.dir, apiPortFile), []byte(port+"\n"), 0o644)
	}
	return nil
}

// writeKubeconfig writes a kubeconfig for server (CA embedded, namespace
// default) that authenticates as user with the token in tokenPath.
func writeKubeconfig(path, server string, ca []byte, tokenPath, user string) error {
	token, err := readTrimmed(tokenPath)
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["testenv"] = &clientcmdapi.Cluster{
		Server:                   server,
		CertificateAuthorityData: ca,
	}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["testenv"] = &clientcmdapi.Context{Cluster: "testenv", AuthInfo: user, Namespace: "default"}
	cfg.CurrentContext = "testenv"
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, data, 0o600)
}

// alive reports whether pid runs and is not a zombie.
func alive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z' && s[i+2] != 'X'
}

// ---------------------------------------------------------------- helpers

// mergeFlags overrides defaults with "--name=value" args and returns sorted flags.
func mergeFlags(defaults map[string]string, extra []string) ([]string, error) {
	for _, a := range extra {
		name, value, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.HasPrefix(a, "--") || !ok || name == "" {
			return nil, fmt.Errorf("component flags must have the form --name=value, got %q", a)
		}
		defaults[name] = value
	}
	names := make([]string, 0, len(defaults))
	for n := range defaults {
		names = append(names, n)
	}
	sort.Strings(names)
	out := make([]string, 0, len(names))
	for _, n := range names {
		out = append(out, "--"+n+"="+defaults[n])
	}
	return out, nil
}

// stickyArgs saves extra args given at the first start and returns the saved
// ones when none are given, so a restart runs with the same flags.
func stickyArgs(path string, extra []string) ([]string, error) {
	if len(extra) > 0 {
		return extra, writeFileAtomic(path, []byte(strings.Join(extra, "\n")+"\n"), 0o644)
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var args []string
	for _, line := range strings.Split(string(data), "\n") {
		if line != "" {
			args = append(args, line)
		}
	}
	return args, nil
}

// stickyPorts returns n free loopback ports, or the ones saved in path.
func stickyPorts(path string, n int) ([]int, error) {
	if data, err := os.ReadFile(path); err == nil {
		var ports []int
		for _, f := range strings.Fields(string(data)) {
			p, err := strconv.Atoi(f)
			if err != nil {
				return nil, fmt.Errorf("%s: %v", path, err)
			}
			ports = append(ports, p)
		}
		if len(ports) == n {
			return ports, nil
		}
	}
	ports := make([]int, 0, n)
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	strs := make([]string, n)
	for i, p := range ports {
		strs[i] = strconv.Itoa(p)
	}
	return ports, writeFileAtomic(path, []byte(strings.Join(strs, " ")+"\n"), 0o644)
}

func readTrimmed(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return s, nil
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
