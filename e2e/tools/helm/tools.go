//go:build tools

// Package tools keeps helm's CLI (built by e2e/build-tools.sh) in go.mod and
// go.sum. It is never compiled into anything.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
