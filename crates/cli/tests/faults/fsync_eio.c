/* Disk-fault injection for the tests: an LD_PRELOAD library that makes fsync and
 * fdatasync fail with EIO in a chosen process, the way a failing disk or a lost
 * writeback reports itself to the program (fsyncgate).
 *
 * Armed per process: the calls fail while the file "$TERN_FAULT_FSYNC_EIO_DIR/<pid>"
 * exists, and pass through to libc otherwise. Without the variable it does nothing.
 * Built by the tests themselves (crates/cli/tests/cluster.rs): cc -shared -fPIC. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int armed(void) {
    const char *dir = getenv("TERN_FAULT_FSYNC_EIO_DIR");
    char path[4096];
    if (dir == NULL) return 0;
    if (snprintf(path, sizeof path, "%s/%d", dir, (int)getpid()) >= (int)sizeof path) return 0;
    return access(path, F_OK) == 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (armed()) { errno = EIO; return -1; }
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (armed()) { errno = EIO; return -1; }
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
