/* The shm copy lane's key table.
 *
 * On the copy lane (atx.c, post_one) the *writer* copies a write into the
 * target with process_vm_writev inside libfabric 1.17's fi_writemsg ("fast
 * RMA"), and shm checks no key on that path: a write through the
 * descriptor of a region the target has deregistered (its buffer perhaps
 * freed and reused) landed all the same (measured, session 13).  So each
 * shm engine keeps, in shared memory (/dev/shm/atx-keys-<engine id>), the
 * keys of its registered regions with their bounds, and a writer may take
 * the copy lane only while the table admits the write.  The table's lock
 * is held from the check until the post returns, and deregistration takes
 * it to withdraw the key: no copy is under way once atx_keytab_remove
 * returns, and none starts after.  A write the table does not admit goes
 * the provider's other path, where the target checks the key itself.
 *
 * The lock word holds the holder's pid; a waiter that finds the holder's
 * process gone (killed inside a copy) takes the lock over.  Open
 * addressing on the key (keys are random, never reused by an engine);
 * withdrawn keys leave tombstones that a later key reuses. */
#define _GNU_SOURCE
#include "shm_keys.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define KT_MAGIC 0x7379656b78746100ULL   /* "\0atxkeys" */
#define KT_VERSION 1u
#define KT_CAP 16384u                    /* a power of two */
enum { KT_EMPTY = 0, KT_LIVE = 1, KT_GONE = 2 };

typedef struct {
    uint64_t key, base, len, state;
} kt_ent;

typedef struct {
    uint64_t magic;
    uint32_t version, cap;
    int32_t pid;                 /* the owner */
    int32_t lock;                /* the holder's pid, 0: free */
    uint32_t shut;               /* the owner engine stopped: nothing is admitted */
    uint32_t pad;
    kt_ent ent[];
} kt_shared;

struct atx_keytab {
    kt_shared *s;
    size_t size;
    char name[48];
};

static size_t kt_size(uint32_t cap) { return sizeof(kt_shared) + (size_t)cap * sizeof(kt_ent); }

static void kt_name(char *buf, size_t n, uint64_t id) {
    snprintf(buf, n, "/atx-keys-%016llx", (unsigned long long)id);
}

atx_keytab *atx_keytab_create(uint64_t engine_id) {
    atx_keytab *t = calloc(1, sizeof(*t));
    int fd;
    if (!t) return NULL;
    kt_name(t->name, sizeof(t->name), engine_id);
    t->size = kt_size(KT_CAP);
    fd = shm_open(t->name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) goto fail;
    if (ftruncate(fd, (off_t)t->size) != 0) {
        close(fd);
        shm_unlink(t->name);
        goto fail;
    }
    t->s = mmap(NULL, t->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (t->s == MAP_FAILED) {
        shm_unlink(t->name);
        goto fail;
    }
    t->s->version = KT_VERSION;
    t->s->cap = KT_CAP;
    t->s->pid = (int32_t)getpid();
    __atomic_store_n(&t->s->magic, KT_MAGIC, __ATOMIC_RELEASE);
    return t;
fail:
    free(t);
    return NULL;
}

atx_keytab *atx_keytab_open(uint64_t engine_id) {
    atx_keytab *t = calloc(1, sizeof(*t));
    struct stat st;
    int fd;
    if (!t) return NULL;
    kt_name(t->name, sizeof(t->name), engine_id);
    fd = shm_open(t->name, O_RDWR, 0);
    if (fd < 0) goto fail;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < kt_size(KT_CAP)) {
        close(fd);
        errno = EPROTO;
        goto fail;
    }
    t->size = kt_size(KT_CAP);
    t->s = mmap(NULL, t->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (t->s == MAP_FAILED) goto fail;
    if (__atomic_load_n(&t->s->magic, __ATOMIC_ACQUIRE) != KT_MAGIC ||
        t->s->version != KT_VERSION || t->s->cap != KT_CAP) {
        munmap(t->s, t->size);
        errno = EPROTO;
        goto fail;
    }
    return t;
fail:
    free(t);
    return NULL;
}

void atx_keytab_close(atx_keytab *t, int unlink_name) {
    if (!t) return;
    if (unlink_name) shm_unlink(t->name);
    munmap(t->s, t->size);
    free(t);
}

static void kt_lock(kt_shared *s) {
    int32_t me = (int32_t)getpid();
    unsigned spins = 0;
    for (;;) {
        int32_t free_ = 0, holder;
        if (__atomic_compare_exchange_n(&s->lock, &free_, me, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        if (++spins < 256) {
            __builtin_ia32_pause();
            continue;
        }
        spins = 0;
        holder = __atomic_load_n(&s->lock, __ATOMIC_RELAXED);
        /* a holder killed inside a copy never lets go: take it over */
        if (holder && holder != me && kill(holder, 0) != 0 && errno == ESRCH)
            __atomic_compare_exchange_n(&s->lock, &holder, 0, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED);
        sched_yield();
    }
}

static void kt_unlock(kt_shared *s) { __atomic_store_n(&s->lock, 0, __ATOMIC_RELEASE); }

static uint32_t kt_home(const kt_shared *s, uint64_t key) {
    return (uint32_t)((key * 0x9e3779b97f4a7c15ULL) >> 32) & (s->cap - 1);
}

/* The live entry of key, or NULL (under the lock). */
static kt_ent *kt_find(kt_shared *s, uint64_t key) {
    uint32_t i = kt_home(s, key);
    for (uint32_t n = 0; n < s->cap; n++, i = (i + 1) & (s->cap - 1)) {
        kt_ent *x = &s->ent[i];
        if (x->state == KT_EMPTY) return NULL;
        if (x->state == KT_LIVE && x->key == key) return x;
    }
    return NULL;
}

int atx_keytab_add(atx_keytab *t, uint64_t key, uint64_t base, uint64_t len) {
    kt_shared *s = t->s;
    uint32_t i = kt_home(s, key);
    int rc = -1;
    kt_lock(s);
    for (uint32_t n = 0; n < s->cap; n++, i = (i + 1) & (s->cap - 1)) {
        kt_ent *x = &s->ent[i];
        if (x->state != KT_LIVE) {
            x->key = key;
            x->base = base;
            x->len = len;
            x->state = KT_LIVE;
            rc = 0;
            break;
        }
    }
    kt_unlock(s);
    return rc;
}

void atx_keytab_remove(atx_keytab *t, uint64_t key) {
    kt_ent *x;
    kt_lock(t->s);
    x = kt_find(t->s, key);
    if (x) x->state = KT_GONE;
    kt_unlock(t->s);
}

void atx_keytab_shut(atx_keytab *t) {
    kt_lock(t->s);
    t->s->shut = 1;
    kt_unlock(t->s);
}

int atx_keytab_admit(atx_keytab *t, uint64_t key, uint64_t addr, uint64_t len) {
    kt_shared *s = t->s;
    kt_ent *x;
    kt_lock(s);
    x = s->shut ? NULL : kt_find(s, key);
    if (x && addr >= x->base && len <= x->len && addr - x->base <= x->len - len)
        return 1;   /* (locked until atx_keytab_release) */
    kt_unlock(s);
    return 0;
}

void atx_keytab_release(atx_keytab *t) { kt_unlock(t->s); }
