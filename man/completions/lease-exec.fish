complete -c lease-exec -s n -l namespace -d 'Namespace of the Lease [default: POD_NAMESPACE, else the in-cluster service-account namespace, else the kubeconfig context\'s namespace, else `default`]' -r
complete -c lease-exec -l identity -d 'Holder identity written to the Lease [default: POD_NAME (else the hostname) plus a random suffix, unique per process]. A stable identity lets a restarted process resume its leadership at once; it is then your promise that no two live processes share it' -r
complete -c lease-exec -l holders -d 'Let up to N copies of the command run at once (a semaphore): N Leases LEASE-0 to LEASE-(N-1), each held by one process at a time; a candidate waits for all of them and takes whichever frees first, never more than one. The command gets LEASE_EXEC_SLOT. 1: the one Lease LEASE' -r
complete -c lease-exec -l lease-duration -d 'leaseDurationSeconds written to the Lease: how long others wait after the last renewal (whole seconds)' -r
complete -c lease-exec -l renew-deadline -d 'How long renewals may keep failing before leadership counts as lost' -r
complete -c lease-exec -l retry-period -d 'Retry interval: between renewals after the server answered one with an error, and between polls while waiting (with --no-watch); a broken watch is re-established sooner (within 1 s, at most this). At least 100ms' -r
complete -c lease-exec -l renew-interval -d 'Interval between renewals while they succeed [default: a third of --lease-duration, at most half of --renew-deadline, at least --retry-period]. At least 100ms, and at least 200ms before --renew-deadline: each renewal attempt gets half the time between them, so two fit. The deadlines do not depend on it' -r
complete -c lease-exec -l grace-period -d 'Time the command gets between SIGTERM and SIGKILL. On lost leadership it is cut short so the command is dead before the Lease can expire for others' -r
complete -c lease-exec -l wait-timeout -d 'Give up (exit 124) if not leader by then; with --handover, if not handed over by then [default: wait forever]' -r
complete -c lease-exec -l to -d 'With --handover: the identity to hand the Lease over to [default: any other candidate]' -r
complete -c lease-exec -s o -l output -d 'Output of --status, --check and --handover' -r -f -a "text\t'For people'
json\t'One JSON object, for scripts'"
complete -c lease-exec -l metrics-addr -d 'Serve Prometheus metrics on /metrics, liveness on /healthz and leadership on /leader at this address (e.g. `0.0.0.0:9090`) [default: off]' -r
complete -c lease-exec -l statsd-addr -d 'Send the statsd counter `<prefix>.leader_running` every retry period while leading [default: off]' -r
complete -c lease-exec -l statsd-prefix -d 'Prefix of statsd metric names' -r
complete -c lease-exec -l log-format -d 'Log format on stderr; filter with RUST_LOG' -r -f -a "text\t'One line per event'
json\t'One JSON object per line'"
complete -c lease-exec -l generate -d 'Write the man page or a shell completion script to stdout and exit' -r -f -a "man\t'The man page (roff)'
bash\t'bash completion'
zsh\t'zsh completion'
fish\t'fish completion'"
complete -c lease-exec -l kubeconfig -d 'Path to a kubeconfig file [default: KUBECONFIG, else ~/.kube/config; in a pod, the in-cluster config]' -r -F
complete -c lease-exec -l context -d 'Kubeconfig context to use [default: the current context]' -r
complete -c lease-exec -l no-release -d 'Keep the Lease claimed at exit instead of releasing it for the next candidate'
complete -c lease-exec -l owner-pod -d 'Name this Pod (POD_NAME, POD_UID) as the Lease\'s owner while holding it, so the garbage collector deletes the Lease with the Pod. Off by default: a force-deleted Pod\'s container may still run while its Lease is collected, so candidates then wait a lease duration before creating it again. Only in the Pod\'s own namespace'
complete -c lease-exec -l recampaign -d 'After leadership is lost and the command stopped, wait for the Lease again and re-run the command when it is won, instead of exiting 75 (for runs outside a kubelet\'s restart loop: by hand, under systemd, in a script). The command\'s own exit still ends lease-exec'
complete -c lease-exec -l no-watch -d 'Send no watch request at all (for API servers or proxies that break watches): poll the Lease every retry period while waiting; while leading, read it every retry period to notice a takeover or an edit'
complete -c lease-exec -l status -d 'Print the Lease as a person wants to read it (holder, renewed, expires, transitions, owner) and what a new candidate with this identity would do with it, and exit 0; no command is run'
complete -c lease-exec -l check -d 'Check that lease-exec would work here, touching nothing, and exit: the cluster configuration and server, identity, namespace, each permission the Role must grant (asked of the API server), the Lease and what a new candidate would do with it, a watch through whatever is in between, the clock against the API server\'s, and the timing. Exit 0 when nothing fails, 125 otherwise'
complete -c lease-exec -l handover -d 'Ask the Lease\'s holder to hand it over (sets spec.preferredHolder, as Kubernetes\' coordinated leader election does), wait for the new holder, and print who took over and how long the Lease stayed free; no command is run. Exit 0, 124 after --wait-timeout (the request is then withdrawn), 125 if refused'
complete -c lease-exec -l no-events -d 'Do not record Kubernetes Events on the Lease when it is acquired, lost or released'
complete -c lease-exec -s h -l help -d 'Print help (see more with \'--help\')'
complete -c lease-exec -s V -l version -d 'Print version'
