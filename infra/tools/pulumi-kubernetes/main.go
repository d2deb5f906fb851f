// Command pulumi-resource-kubernetes: the Pulumi Kubernetes provider plugin, built from
// the published Go module github.com/pulumi/pulumi-kubernetes/provider/v4.
//
// The upstream cmd/pulumi-resource-kubernetes package embeds schema-embed.json and
// terraform-mapping-embed.json, which `go generate` writes at release time and which
// are not in the module. This main does the same thing as upstream's: the builder
// (infra/tools/build_steps.py) copies this directory to a temporary one, writes the
// two files there from the module's cmd/pulumi-resource-kubernetes/schema.json (with
// "version" set) and terraform-mapping.json, and builds. The generated files are
// never committed.
package main

import (
	_ "embed"

	"github.com/pulumi/pulumi-kubernetes/provider/v4/pkg/provider"
	"github.com/pulumi/pulumi-kubernetes/provider/v4/pkg/version"
)

//go:embed schema-embed.json
var pulumiSchema []byte

//go:embed terraform-mapping-embed.json
var terraformMapping []byte

func main() {
	provider.Serve("kubernetes", version.Version, pulumiSchema, terraformMapping)
}
