// Command pause is the sandbox ("pause") container of the local real node: it holds the pod's namespaces open and
// does nothing else until the kubelet stops the sandbox. Built here because there is no registry to pull one from.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
