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
 * Our own region's lock.  An initiator takes it to post into our region;
 * over the copy lane (atx.c, post_one) it holds it for the whole copy of a
 * write into our memory (process_vm_writev, up to 16 MiB: milliseconds).
 * An initiator killed meanwhile leaves it taken: our next poll spins for
 * ever once the region is signalled (seen: one random writer kill in ten
 * at 1 MiB, the target's event loop frozen inside fi_cq_read), and so does
 * any other process's next post into it.  The lock records no holder, so
 * the owner's watch (atx.c, own_watch) decides from the outside, and only
 * when every sign agrees: the lock seen taken at every look for a second
 * with the region's command queue still (nobody posted, nobody drained:
 * no live poster or drain cycles the lock like that); if a thread of the
 * engine is inside a provider call all that time, its CPU time all user
 * time (spinning; a copy of our own would be kernel time); and a process
 * that mapped a region of its own next to ours is gone.  Then
 * atx_shm_release_region frees it.
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

/* The 1.17 region at [lo, hi) mapped from /dev/shm/<name>, or NULL. */
static struct smr117_head *region117(uintptr_t lo, uintptr_t hi, const char *name) {
    struct smr117_head *h = (struct smr117_head *)lo;
    const char *rname;
    size_t n = strlen(name);
    if (hi - lo < sizeof(*h)) return NULL;
    if (h->version != SMR117_VERSION || h->pid <= 0) return NULL;
    if (h->total_size != hi - lo) return NULL;
    if (h->name_offset < sizeof(*h) || h->name_offset > h->total_size - SMR117_NAME_MAX)
        return NULL;
    rname = (const char *)(lo + h->name_offset);
    if (n >= SMR117_NAME_MAX || strncmp(rname, name, SMR117_NAME_MAX) != 0) return NULL;
    return h;
}

/* Call fn(region, name, arg) for every 1.17 region mapped from /dev/shm. */
static void each_region(void (*fn)(struct smr117_head *, const char *, void *), void *arg) {
    FILE *f = fopen("/proc/self/maps", "re");
    char line[4096 + 128];
    if (!f) return;
    while (fgets(line, sizeof(line), f)) {
        uintptr_t lo, hi;
        char perms[8], *path, *end;
        struct smr117_head *h;
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3) continue;
        if (perms[0] != 'r' || perms[1] != 'w' || perms[3] != 's') continue;
        path = strstr(line, " /dev/shm/");
        if (!path) continue;
        path += strlen(" /dev/shm/");
        end = strchr(path, '\n');
        if (end) *end = 0;
        end = strstr(path, " (deleted)");
        if (end) *end = 0;
        h = region117(lo, hi, path);
        if (h) fn(h, path, arg);
    }
    fclose(f);
}

/* Release a taken lock through glibc's own calls: what "taken" and "free"
 * are is the platform's business (x86-64: 1 is free, the lock decrements).
 * Returns 1 if it was taken. */
static int release(pthread_spinlock_t *lock) {
    int was_taken = pthread_spin_trylock(lock) != 0;
    pthread_spin_unlock(lock);
    return was_taken;
}

/* A peer's region (not ours) whose owner process is gone. */
static int peer_gone(const struct smr117_head *h) {
    return h->pid != (int)getpid() && owner_gone(h->pid);
}

static void release_dead_owner(struct smr117_head *h, const char *name, void *arg) {
    (void)name;
    if (peer_gone(h)) *(int *)arg += release(&h->lock);
}

int atx_shm_unstick(void) {
    int released = 0;
    each_region(release_dead_owner, &released);
    return released;
}

/* ---- our own regions */

struct find_own {
    const char *name;
    struct smr117_head *head;
};

static void find_own(struct smr117_head *h, const char *name, void *arg) {
    struct find_own *f = arg;
    if (h->pid == (int)getpid() && strcmp(name, f->name) == 0) f->head = h;
}

void *atx_shm_own_region(const char *name) {
    struct find_own f = {name, NULL};
    each_region(find_own, &f);
    if (f.head && f.head->cmd_queue_offset > f.head->total_size - 4 * sizeof(size_t))
        return NULL;
    return f.head;
}

int atx_shm_region_taken(void *head, uint64_t *moves) {
    const struct smr117_head *h = head;
    const volatile size_t *q = (const volatile size_t *)((const char *)head + h->cmd_queue_offset);
    *moves = (uint64_t)(q[2] + q[3]);   /* the command queue's read + write counts */
#if defined(__x86_64__)
    /* a plain read of the lock word: glibc's x86-64 spin lock is free at 1
     * (elsewhere a trylock would take it, so do not guess) */
    return __atomic_load_n((const volatile int *)&h->lock, __ATOMIC_RELAXED) != 1;
#else
    return 0;
#endif
}

static void any_dead(struct smr117_head *h, const char *name, void *arg) {
    (void)name;
    if (peer_gone(h)) *(int *)arg = 1;
}

int atx_shm_dead_peer(void) {
    int dead = 0;
    each_region(any_dead, &dead);
    return dead;
}

int atx_shm_release_region(void *head) {
    return release(&((struct smr117_head *)head)->lock);
}
