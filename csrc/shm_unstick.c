/* libfabric 1.17 shm: release a peer region's lock whose holder died.
 *
 * The shm provider of libfabric 1.17 keeps, at the head of every endpoint's
 * shared-memory region, a pthread spin lock.  The region's owner holds it
 * while it copies every queued write (process_vm_readv), and an initiator
 * takes it, spinning, to post a command (fi_writemsg, fi_send).  A process
 * killed while it holds its own region's lock leaves the lock taken for
 * ever, and the next post to it spins for ever: measured here, a writer's
 * event loop froze inside fi_writemsg after its target was SIGKILLed in the
 * middle of a burst (tests/test_multiprocess.py, target killed at random
 * moments).
 *
 * Nothing in libfabric's API reaches that lock, so this looks at the
 * provider's mappings of peer regions in /proc/self/maps ("/dev/shm/<name>",
 * also once the file is unlinked) and, for a region whose header is the
 * 1.17 layout (version 4, the region's own name at its name offset) and
 * whose owner process no longer exists, unlocks a taken lock.  The
 * owner is dead, so whoever spins on the lock is an initiator, and the
 * region is never read again by its owner: what the freed initiator then
 * posts into it is lost, and the engine's stall scan fails the operation
 * (PeerError) after the peer timeout.  A lock whose owner is alive is never
 * touched.  Called only when a post has been stuck for ATX_STUCK_NS.
 *
 * Not covered: an initiator that dies while it holds *our* region's lock
 * (for the microsecond of a post) would stop our own progress; the lock
 * records no holder, so that case cannot be told from a live poster.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "shm_unstick.h"

/* The head of struct smr_region in libfabric 1.17 (include/ofi_shm.h,
 * SMR_VERSION 4).  Only read through a mapping the provider made. */
struct smr117_head {
    uint8_t version;
    uint8_t resv;
    uint16_t flags;
    int pid;
    uint8_t cma_cap_peer;
    uint8_t cma_cap_self;
    uint32_t max_sar_buf_per_peer;
    void *base_addr;
    pthread_spinlock_t lock;
    int32_t signal;
    void *map;
    size_t total_size;
    size_t cmd_cnt;
    size_t sar_cnt;
    size_t cmd_queue_offset;
    size_t resp_queue_offset;
    size_t inject_pool_offset;
    size_t sar_pool_offset;
    size_t peer_data_offset;
    size_t name_offset;
    size_t sock_name_offset;
};

#define SMR117_VERSION 4
#define SMR117_NAME_MAX 256

/* Gone: no such process, or a zombie (killed, not yet reaped: its memory
 * is gone and it will never unlock; a parent whose thread is stuck here may
 * be the one that would reap it). */
static int owner_gone(int pid) {
    char path[64], buf[512], *p;
    FILE *f;
    size_t n;
    if (pid <= 0) return 0;
    if (kill((pid_t)pid, 0) != 0) return errno == ESRCH;
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    f = fopen(path, "re");
    if (!f) return errno == ENOENT;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    p = strrchr(buf, ')');   /* "pid (comm) S ...": comm may hold anything */
    return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

/* The region at [lo, hi) mapped from /dev/shm/<name>: its lock, if the
 * header is the 1.17 layout, names this region and the owner is gone. */
static pthread_spinlock_t *dead_owner_lock(uintptr_t lo, uintptr_t hi, const char *name) {
    const struct smr117_head *h = (const struct smr117_head *)lo;
    const char *rname;
    size_t n = strlen(name);
    if (hi - lo < sizeof(*h)) return NULL;
    if (h->version != SMR117_VERSION || h->pid <= 0 || h->pid == (int)getpid()) return NULL;
    if (h->total_size != hi - lo) return NULL;
    if (h->name_offset < sizeof(*h) || h->name_offset > h->total_size - SMR117_NAME_MAX)
        return NULL;
    rname = (const char *)(lo + h->name_offset);
    if (n >= SMR117_NAME_MAX || strncmp(rname, name, SMR117_NAME_MAX) != 0) return NULL;
    if (!owner_gone(h->pid)) return NULL;
    return &((struct smr117_head *)lo)->lock;
}

int atx_shm_unstick(void) {
    FILE *f = fopen("/proc/self/maps", "re");
    char line[4096 + 128];
    int released = 0;
    if (!f) return 0;
    while (fgets(line, sizeof(line), f)) {
        uintptr_t lo, hi;
        char perms[8], *path, *end;
        pthread_spinlock_t *lock;
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3) continue;
        if (perms[0] != 'r' || perms[1] != 'w' || perms[3] != 's') continue;
        path = strstr(line, " /dev/shm/");
        if (!path) continue;
        path += strlen(" /dev/shm/");
        end = strchr(path, '\n');
        if (end) *end = 0;
        end = strstr(path, " (deleted)");
        if (end) *end = 0;
        lock = dead_owner_lock(lo, hi, path);
        if (!lock) continue;
        /* through glibc's own calls: what "taken" and "free" are is the
         * platform's business (x86-64: 1 is free, the lock decrements) */
        if (pthread_spin_trylock(lock) != 0) released++;
        pthread_spin_unlock(lock);
    }
    fclose(f);
    return released;
}
