// The Pod sandbox's process: holds the Pod's namespaces open and does nothing else.
//
// Built locally (no registry is reachable in the test environment) as a static binary and put
// into a one-file image that containerd uses as its sandbox image. As PID 1 of the sandbox it
// exits on SIGTERM or SIGINT, and reaps nothing because nothing else runs in its PID namespace.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
