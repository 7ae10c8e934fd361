package main

// Fault proxies in front of the HA API servers: a Toxiproxy server (its own Go
// server package) as one process, and the proxy and toxic subcommands that
// drive it through the Toxiproxy Go client. Each HA API server also reaches
// the etcd members through proxies of its own (etcdThroughProxies), which the
// etcd-toxic subcommand hits.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	toxiclient "github.com/Shopify/toxiproxy/v2/client"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

const (
	toxiproxyPortFile = "toxiproxy.port" // the Toxiproxy API's port on 127.0.0.1
	proxyDir          = "proxy"          // D/proxy/NAME/kubeconfig and port
	proxyPortFile     = "port"
)

var proxyNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// runToxiproxy serves the Toxiproxy API on a sticky loopback port until
// SIGTERM or SIGINT.
func runToxiproxy(args []string) error {
	fs := flag.NewFlagSet("toxiproxy", flag.ContinueOnError)
	dir, _, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	ports, err := stickyPorts(filepath.Join(dir, toxiproxyPortFile), 1)
	if err != nil {
		return err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("toxiproxy API: %v", err)
	}
	logger := zerolog.New(os.Stderr).With().Timestamp().Logger().Level(zerolog.InfoLevel)
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), logger)
	httpServer := &http.Server{Handler: server.Routes(), ReadHeaderTimeout: 15 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- httpServer.Serve(ln) }()
	fmt.Fprintf(os.Stderr, "toxiproxy %s API at http://%s\n", toxiproxy.Version, addr)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	select {
	case <-ctx.Done():
		fmt.Fprintln(os.Stderr, "toxiproxy stopping")
	case err := <-errc:
		return err
	}
	_ = httpServer.Close()
	return server.Collection.Clear()
}

func toxiproxyClient(dir string) (*toxiclient.Client, error) {
	port, err := readTrimmed(filepath.Join(dir, toxiproxyPortFile))
	if err != nil {
		return nil, fmt.Errorf("no Toxiproxy server in %s: %v", dir, err)
	}
	return toxiclient.NewClient(net.JoinHostPort("127.0.0.1", port)), nil
}

func toxiproxyReady(dir string) error {
	c, err := toxiproxyClient(dir)
	if err != nil {
		return err
	}
	_, err = c.Version()
	return err
}

func apiStatus(err error) int {
	var apiErr *toxiclient.ApiError
	if errors.As(err, &apiErr) {
		return apiErr.Status
	}
	return 0
}

// runProxy creates proxy NAME on a free loopback port in front of API server N
// and writes D/proxy/NAME/kubeconfig (admin) through it.
func runProxy(args []string) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	name := fs.String("name", "", "proxy name")
	index := fs.String("apiserver", "", "the API server behind the proxy (0 or 1)")
	dir, _, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if !proxyNameRE.MatchString(*name) {
		return fmt.Errorf("bad proxy name %q: use letters, digits, '.', '_' and '-' (at most 63, not starting with '.', '_' or '-')", *name)
	}
	if !isHA(dir) {
		return fmt.Errorf("%s is not an HA cluster", dir)
	}
	n, err := parseIndex(*index, haAPIServers)
	if err != nil {
		return fmt.Errorf("--apiserver: %v", err)
	}
	apiPort, err := readTrimmed(newAPILayout(dir, n).portFile())
	if err != nil {
		return fmt.Errorf("API server %d has no port yet: %v", n, err)
	}
	ca, err := os.ReadFile(filepath.Join(dir, caFile))
	if err != nil {
		return err
	}
	out := filepath.Join(dir, proxyDir, *name)
	exists := fmt.Errorf("proxy %q already exists in %s (pick another NAME)", *name, dir)
	if _, err := os.Stat(out); err == nil {
		return exists
	}
	c, err := toxiproxyClient(dir)
	if err != nil {
		return err
	}
	p, err := c.CreateProxy(*name, "127.0.0.1:0", net.JoinHostPort("127.0.0.1", apiPort))
	if apiStatus(err) == http.StatusConflict {
		return exists
	}
	if err != nil {
		return fmt.Errorf("creating proxy %q: %v", *name, err)
	}
	path, err := writeProxyFiles(dir, out, p.Listen, ca)
	if err != nil {
		_ = p.Delete()
		_ = os.RemoveAll(out)
		return err
	}
	fmt.Println(path)
	return nil
}

func writeProxyFiles(dir, out, listen string, ca []byte) (string, error) {
	_, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("proxy listens on %q: %v", listen, err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", err
	}
	if err := writeFileAtomic(filepath.Join(out, proxyPortFile), []byte(port+"\n"), 0o644); err != nil {
		return "", err
	}
	path := filepath.Join(out, kubeconfigFile)
	return path, writeKubeconfig(path, "https://127.0.0.1:"+port, ca, filepath.Join(dir, adminTokenFile), adminUser)
}

// checkToxicKind checks a toxic's kind and its --ms.
func checkToxicKind(kind string, ms int) error {
	switch kind {
	case "partition", "half-open", "reset", "heal":
		if ms >= 0 {
			return fmt.Errorf("--ms applies to latency only, not %s", kind)
		}
	case "latency":
		if ms < 0 {
			return errors.New("latency needs --ms MS (a whole number of milliseconds)")
		}
	default:
		return fmt.Errorf("unknown toxic %q (partition, half-open, reset, latency MS or heal)", kind)
	}
	return nil
}

// A toxic this program adds, by name (one per direction where both apply).
type toxicSpec struct {
	name, typ, stream string
	attrs             toxiclient.Attributes
}

func halfOpenToxics() []toxicSpec {
	return []toxicSpec{
		{"half-open-upstream", "timeout", "upstream", toxiclient.Attributes{"timeout": 0}},
		{"half-open-downstream", "timeout", "downstream", toxiclient.Attributes{"timeout": 0}},
	}
}

func resetToxics() []toxicSpec {
	return []toxicSpec{
		{"reset-upstream", "reset_peer", "upstream", toxiclient.Attributes{"timeout": 0}},
		{"reset-downstream", "reset_peer", "downstream", toxiclient.Attributes{"timeout": 0}},
	}
}

func latencyToxic(ms int) toxicSpec {
	return toxicSpec{"latency", "latency", "downstream", toxiclient.Attributes{"latency": ms, "jitter": 0}}
}

// runToxic applies a fault to proxy NAME. partition, half-open and reset
// replace one another; latency combines with any of them; heal removes all.
func runToxic(args []string) error {
	fs := flag.NewFlagSet("toxic", flag.ContinueOnError)
	name := fs.String("name", "", "proxy name")
	kind := fs.String("kind", "", "partition, half-open, reset, latency or heal")
	ms := fs.Int("ms", -1, "latency in milliseconds (latency only)")
	dir, _, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if err := checkToxicKind(*kind, *ms); err != nil {
		return err
	}
	c, err := toxiproxyClient(dir)
	if err != nil {
		return err
	}
	return applyToxic(c, *name, *kind, *ms, fmt.Sprintf("create it: cluster proxy %s %s N", dir, *name))
}

// applyToxic applies the toxic kind (checked by the caller) to proxy name;
// hint says what to do when there is no such proxy.
func applyToxic(c *toxiclient.Client, name, kind string, ms int, hint string) error {
	p, err := c.Proxy(name)
	if apiStatus(err) == http.StatusNotFound {
		return fmt.Errorf("no proxy %q (%s)", name, hint)
	}
	if err != nil {
		return fmt.Errorf("proxy %q: %v", name, err)
	}
	present, err := p.Toxics()
	if err != nil {
		return fmt.Errorf("proxy %q: %v", name, err)
	}
	t := toxicker{p: p, present: map[string]toxiclient.Toxic{}}
	for _, x := range present {
		t.present[x.Name] = x
	}
	switch kind {
	case "partition":
		// Refuses new connections and closes the open ones.
		t.disable()
		t.remove(halfOpenToxics()...)
		t.remove(resetToxics()...)
	case "half-open":
		t.ensure(halfOpenToxics()...)
		t.remove(resetToxics()...)
		t.enable()
	case "reset":
		t.ensure(resetToxics()...)
		t.remove(halfOpenToxics()...)
		t.enable()
	case "latency":
		t.ensure(latencyToxic(ms))
	case "heal":
		for n := range t.present {
			t.removeNamed(n)
		}
		t.enable()
	}
	if t.err != nil {
		return fmt.Errorf("proxy %q: %s: %v", name, kind, t.err)
	}
	return nil
}

// ---------------------------------------------------------------- between an API server and etcd

// etcdProxyPortsFile, in D/apiserver-N, keeps the ports of that API server's
// proxies to the etcd members (one per member), so that they stay the same
// across restarts of the API server.
const etcdProxyPortsFile = "etcd-proxy.ports"

// etcdProxyName names the proxy between API server n and etcd member m.
func etcdProxyName(n, m int) string { return fmt.Sprintf("apiserver-%d-etcd-%d", n, m) }

// etcdThroughProxies makes API server l reach each etcd member through a
// Toxiproxy proxy of its own (apiserver-N-etcd-M), creating the proxies that
// are missing, and returns their URLs for --etcd-servers. A toxic on them
// (controlplane etcd-toxic) then hits this API server's traffic with etcd
// only: a latency makes its watch cache lag behind etcd while the other API
// server's stays current. Toxics already on a proxy are kept (a restarted API
// server finds its fault still there).
func etcdThroughProxies(dir string, l apiLayout, endpoints []string) ([]string, error) {
	ports, err := stickyPorts(filepath.Join(l.state, etcdProxyPortsFile), len(endpoints))
	if err != nil {
		return nil, err
	}
	c, err := toxiproxyClient(dir)
	if err != nil {
		return nil, err
	}
	urls := make([]string, len(endpoints))
	for m, endpoint := range endpoints {
		u, err := url.Parse(endpoint)
		if err != nil {
			return nil, fmt.Errorf("etcd member %d: %v", m, err)
		}
		name := etcdProxyName(l.index, m)
		listen := net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[m]))
		p, err := c.Proxy(name)
		switch {
		case err == nil && (p.Listen != listen || p.Upstream != u.Host):
			// Left over from another layout: replace it.
			if err := p.Delete(); err != nil {
				return nil, fmt.Errorf("proxy %q: %v", name, err)
			}
			fallthrough
		case apiStatus(err) == http.StatusNotFound:
			if _, err := c.CreateProxy(name, listen, u.Host); err != nil {
				return nil, fmt.Errorf("creating proxy %q from %s to etcd member %d: %v", name, listen, m, err)
			}
		case err != nil:
			return nil, fmt.Errorf("proxy %q: %v", name, err)
		}
		urls[m] = (&url.URL{Scheme: u.Scheme, Host: listen}).String()
	}
	return urls, nil
}

// runEtcdToxic applies a toxic (as runToxic) to every proxy between API
// server N and the etcd members.
func runEtcdToxic(args []string) error {
	fs := flag.NewFlagSet("etcd-toxic", flag.ContinueOnError)
	index := fs.String("apiserver", "", "the API server whose way to etcd is hit (0 or 1)")
	kind := fs.String("kind", "", "partition, half-open, reset, latency or heal")
	ms := fs.Int("ms", -1, "latency in milliseconds (latency only)")
	dir, _, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if !isHA(dir) {
		return fmt.Errorf("%s is not an HA cluster", dir)
	}
	n, err := parseIndex(*index, haAPIServers)
	if err != nil {
		return fmt.Errorf("--apiserver: %v", err)
	}
	if err := checkToxicKind(*kind, *ms); err != nil {
		return err
	}
	c, err := toxiproxyClient(dir)
	if err != nil {
		return err
	}
	for m := range haEtcdMembers {
		hint := fmt.Sprintf("API server %d was started before its way to etcd went through proxies: restart it", n)
		if err := applyToxic(c, etcdProxyName(n, m), *kind, *ms, hint); err != nil {
			return err
		}
	}
	return nil
}

// toxicker changes one proxy's toxics, keeping the first error.
type toxicker struct {
	p       *toxiclient.Proxy
	present map[string]toxiclient.Toxic
	err     error
}

// ensure adds each toxic, or updates it in place when it is already there.
func (t *toxicker) ensure(specs ...toxicSpec) {
	for _, s := range specs {
		if t.err != nil {
			return
		}
		if cur, ok := t.present[s.name]; ok && (cur.Type != s.typ || cur.Stream != s.stream) {
			t.removeNamed(s.name)
		}
		if _, ok := t.present[s.name]; !ok {
			_, err := t.p.AddToxic(s.name, s.typ, s.stream, 1, s.attrs)
			if apiStatus(err) != http.StatusConflict { // else added meanwhile: update it
				t.err = err
				continue
			}
		}
		_, t.err = t.p.UpdateToxic(s.name, 1, s.attrs)
	}
}

func (t *toxicker) remove(specs ...toxicSpec) {
	for _, s := range specs {
		if _, ok := t.present[s.name]; ok {
			t.removeNamed(s.name)
		}
	}
}

func (t *toxicker) removeNamed(name string) {
	if t.err != nil {
		return
	}
	if err := t.p.RemoveToxic(name); err != nil && apiStatus(err) != http.StatusNotFound {
		t.err = err
	}
	delete(t.present, name)
}

func (t *toxicker) enable() {
	if t.err == nil && !t.p.Enabled {
		t.err = t.p.Enable()
	}
}

func (t *toxicker) disable() {
	if t.err == nil && t.p.Enabled {
		t.err = t.p.Disable()
	}
}
