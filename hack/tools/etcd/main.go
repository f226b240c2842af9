// Command etcd runs the etcd server for the local test cluster.
//
// etcd's own main module replaces its sibling modules with local paths, so
// `go install go.etcd.io/etcd/v3@version` fails; calling the server's entry
// point from this small module builds the same server from published modules.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
