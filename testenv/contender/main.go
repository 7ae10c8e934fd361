// Command contender runs a worker command only while holding a Lease, using
// client-go's leader election (the reference implementation lease-exec is
// compared with):
//
//	contender --lease-name L [--namespace N] [--identity I] [--kubeconfig K] -- worker args...
//
// The worker runs in its own process group. When leadership is lost, or on
// SIGTERM/SIGINT, the group gets SIGTERM and, after --grace-period, SIGKILL; the
// Lease is released only once the worker has exited. Exit codes: the worker's
// own (128+N if killed by signal N) when it exits by itself or the contender is
// told to stop, 75 when leadership is lost, 2 for usage errors, 1 for other
// errors. Every state change is logged to stderr with a timestamp.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

const exitLost = 75

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s contender %s\n", time.Now().Format("2006-01-02T15:04:05.000000Z07:00"), fmt.Sprintf(format, args...))
}

// worker is the command run while leading. stop is idempotent and safe to
// call before start, after which start does nothing.
type worker struct {
	argv  []string
	grace time.Duration
	onEnd func() // called when the worker exits by itself

	mu      sync.Mutex
	cmd     *exec.Cmd
	stopped bool
	done    chan struct{}
	code    int
}

func (w *worker) start() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped || w.cmd != nil {
		return
	}
	cmd := exec.Command(w.argv[0], w.argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	w.done = make(chan struct{})
	if err := cmd.Start(); err != nil {
		logf("worker failed to start: %v", err)
		w.code = 127
		close(w.done)
		w.stopped = true
		go w.onEnd()
		return
	}
	w.cmd = cmd
	logf("worker started pid=%d", cmd.Process.Pid)
	go func() {
		err := cmd.Wait()
		w.mu.Lock()
		w.code = exitCode(cmd, err)
		selfExit := !w.stopped
		w.stopped = true
		w.mu.Unlock()
		logf("worker exited code=%d", w.code)
		close(w.done)
		if selfExit {
			w.onEnd()
		}
	}()
}

// stop kills the worker's process group (SIGTERM, then SIGKILL after grace,
// or at once if grace is 0) and waits until the worker is gone.
func (w *worker) stop(grace time.Duration) {
	w.mu.Lock()
	w.stopped = true
	cmd, done := w.cmd, w.done
	w.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	pgid := cmd.Process.Pid
	if grace > 0 {
		logf("stopping worker: SIGTERM to process group %d", pgid)
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(grace):
		}
	}
	// SIGKILL the group even after the leader exited, for children it left.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-done
}

func exitCode(cmd *exec.Cmd, err error) int {
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return 1
	}
	ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// releasingLock stops the worker before the Lease is released: client-go
// releases the Lease (an Update with an empty holder) before it calls
// OnStoppedLeading, so this is the last point at which the worker can be
// stopped before anybody else may acquire the Lease. It also refuses a release
// when the Lease read just before names another holder (client-go would
// otherwise clear a successor's claim after a lost leadership).
type releasingLock struct {
	resourcelock.Interface
	beforeRelease func()

	mu         sync.Mutex
	lastHolder string
}

func (l *releasingLock) Get(ctx context.Context) (*resourcelock.LeaderElectionRecord, []byte, error) {
	ler, raw, err := l.Interface.Get(ctx)
	if err == nil {
		l.mu.Lock()
		l.lastHolder = ler.HolderIdentity
		l.mu.Unlock()
	}
	return ler, raw, err
}

func (l *releasingLock) Update(ctx context.Context, ler resourcelock.LeaderElectionRecord) error {
	if ler.HolderIdentity == "" {
		l.beforeRelease()
		l.mu.Lock()
		holder := l.lastHolder
		l.mu.Unlock()
		if holder != l.Identity() {
			return fmt.Errorf("not releasing: the Lease is held by %q", holder)
		}
	}
	return l.Interface.Update(ctx, ler)
}

func main() {
	os.Exit(run())
}

func run() int {
	hostname, _ := os.Hostname()
	var (
		leaseName  = flag.String("lease-name", "", "name of the Lease (required)")
		namespace  = flag.String("namespace", "default", "namespace of the Lease")
		identity   = flag.String("identity", fmt.Sprintf("%s-%d", hostname, os.Getpid()), "holder identity")
		kubeconfig = flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file (default $KUBECONFIG, else in-cluster)")
		leaseDur   = flag.Duration("lease-duration", 15*time.Second, "lease duration")
		renewDl    = flag.Duration("renew-deadline", 10*time.Second, "renew deadline")
		retry      = flag.Duration("retry-period", 2*time.Second, "retry period")
		grace      = flag.Duration("grace-period", 5*time.Second, "time between SIGTERM and SIGKILL to the worker; 0 on lost leadership")
	)
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: %s --lease-name NAME [options] -- command [args...]\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if *leaseName == "" || flag.NArg() == 0 {
		flag.Usage()
		return 2
	}

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		logf("kubeconfig: %v", err)
		return 1
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		logf("client: %v", err)
		return 1
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		mu       sync.Mutex
		stopping bool // told to stop, or the worker exited by itself
	)
	w := &worker{argv: flag.Args(), onEnd: func() {
		mu.Lock()
		stopping = true
		mu.Unlock()
		cancel()
	}}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		logf("received %v", s)
		mu.Lock()
		stopping = true
		mu.Unlock()
		cancel()
	}()

	// On a requested stop the worker gets the full grace period; when
	// leadership is lost there is no time to wait.
	stopWorker := func() {
		mu.Lock()
		g := *grace
		if !stopping {
			g = 0
		}
		mu.Unlock()
		w.stop(g)
	}
	lock := &releasingLock{
		Interface: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Name: *leaseName, Namespace: *namespace},
			Client:     client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: *identity},
		},
		beforeRelease: stopWorker,
	}

	logf("identity=%s lease=%s/%s waiting", *identity, *namespace, *leaseName)
	leaderelection.RunOrDie(ctx, leaderelection.LeaderElectionConfig{
		Lock:            lock,
		ReleaseOnCancel: true,
		LeaseDuration:   *leaseDur,
		RenewDeadline:   *renewDl,
		RetryPeriod:     *retry,
		Name:            *leaseName,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(context.Context) {
				logf("started leading")
				w.start()
			},
			OnStoppedLeading: func() {
				stopWorker()
				logf("stopped leading")
			},
			OnNewLeader: func(id string) {
				logf("leader is %s", id)
			},
		},
	})
	mu.Lock()
	requested := stopping
	mu.Unlock()
	w.mu.Lock()
	code, ran := w.code, w.cmd != nil || w.done != nil
	w.mu.Unlock()
	switch {
	case requested && !ran:
		code = 0
	case !requested:
		code = exitLost
	}
	logf("exiting code=%d", code)
	return code
}
