/*
 * check.c: compiled by build.rs (never linked) when the shim itself is
 * built against real illumos headers, so that the minimal declarations
 * are checked against the Rust mirrors in the same build, as the CI build
 * (which uses them) would.
 */
#include "minimal/rvscsi_illumos.h"
#include "rvscsi.h"
#include "rvscsi_abi_asserts.h"

/* ISO C wants a translation unit to declare something. */
typedef int rvscsi_minimal_check_t;
