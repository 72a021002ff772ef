/*
 * atx.c: progress worker, submission/completion queues and immediate
 * counters of aiotransfer.  See atx.h for the contract.
 *
 * Threads:
 *   - the creating (Python) thread builds the libfabric objects, then starts
 *     the worker.
 *   - every libfabric call, and all op/peer/destination state, is under the
 *     progress lock: the worker takes it for rounds of progress, a posting
 *     thread takes it to post its operation inline.
 *   - records go back through `recs` (rec_lock + eventfd).
 *
 * Several NICs: each work request (a chunk, a page, a scatter row, a tail
 * immediate) picks its NIC when it is posted (choose_nic): the NIC with the
 * least work in flight relative to its weight, among those with room.  A
 * NIC that drains faster is chosen more often, so unequal links share the
 * work by their real speed.  The remote NIC follows from the peer's lanes.
 */
#define _GNU_SOURCE
#include "atx.h"
#include "shm_keys.h"
#include "shm_unstick.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#define ATX_CQ_BATCH 32
#define ATX_SPIN_NS 200000ULL         /* keep polling this long after activity */
#define ATX_SLEEP_MIN_NS 20000ULL     /* first sleep of an idle poller */
#define ATX_SLEEP_MAX_NS 1000000ULL   /* longest sleep of an idle poller (1 ms) */
#define ATX_DEEP_IDLE_NS 100000000ULL /* idle this long (100 ms): sleep longer... */
#define ATX_SLEEP_DEEP_NS 5000000ULL  /* ...up to 5 ms between polls */
#define ATX_BLOCK_MS 100              /* safety timer of a blocked worker */
#define ATX_APP_QUIET_NS 20000ULL     /* app progressed this recently: let it drive */
#define ATX_APP_STALE_NS 1000000ULL   /* an app that polls, silent this long: its loop is busy */
#define ATX_APP_DRIVE_NAP_MAX_NS 4000000ULL /* the worker's longest nap while the app drives */
#define ATX_GAP_CAP_NS 2000000ULL     /* a gap between completions counts at most this much... */
#define ATX_GAP_WIN_MAX_NS 4000000ULL /* ...and keeps a poller polling at most this long */
#define ATX_INFLIGHT_POLL_NS 50000000ULL /* the app's loop, work in flight: polls this long
                                           * after the last completion */
#define ATX_STUCK_NS 50000000ULL      /* a call inside the provider this long: see shm_unstick.c */
#define ATX_OWN_STUCK_NS 1000000000ULL /* our own region's lock taken, its queue still, this long */
#define ATX_DRAIN_NS 2000000000ULL    /* close: wait this long for posted requests */
#define ATX_CLOSE_SETTLE_NS 1000000000ULL /* tcp close: its connections wind down this long */
#define ATX_CLOSE_QUIET_NS 5000000ULL /* ...without a CQ wait fd: until nothing came this long */
#define ATX_COALESCE_NS 25000ULL      /* hold a wake-up back at most this long */
#define ATX_COALESCE_MAX 64           /* ...or until this many records wait */
#define ATX_MAX_COUNTERS (1u << 20)   /* distinct immediate values counted at once */
#define ATX_CTAB_KEEP 2048            /* idle counters kept while the table is this small */
#define ATX_STRIPE (512u << 10)       /* several NICs: single writes split into these */
#define ATX_NIC_BUDGET (8u << 20)     /* several NICs: bytes in flight per NIC */
#define ATX_WR_COST 4096u             /* selector: a work request weighs like this many bytes */
#define ATX_PEER_TIMEOUT_NS 5000000000ULL /* no progress to a peer this long: its ops fail */
#define ATX_STALL_SCAN_NS 10000000ULL /* look for stalled operations this often */
#define ATX_FAILOVER_NS 1000000000ULL /* a lane with work and no completion this long: down */
#define ATX_PROBE_NS 500000000ULL     /* a down lane is probed this often */
#define ATX_PROBE_STALL_NS 2000000000ULL /* a probe this old: reconnect and probe again */
#define ATX_RMA_ORDER (FI_ORDER_RAR | FI_ORDER_RAW | FI_ORDER_RAS | FI_ORDER_WAR | \
                       FI_ORDER_WAW | FI_ORDER_WAS | FI_ORDER_SAR | FI_ORDER_SAW)
#define ATX_WR_TAIL UINT64_MAX        /* "work request index" of a tail immediate */
#define ATX_COPY_MAX (16u << 20)      /* largest write the shm copy lane takes */
#define ATX_COPY_MIN (64u << 10)      /* ... and the smallest */
/* 8-byte CQ data: [0,32) immediate | 32 user-imm flag | 33 token | [34,48)
 * sender slot at the receiver | [48,64) sequence (see atx_slot) */
#define ATX_TOK_VALID (1ULL << 33)
#define ATX_TOK_SLOT_SHIFT 34
#define ATX_TOK_SLOT_MASK 0x3fffULL
#define ATX_TOK_SEQ_SHIFT 48
#define ATX_MAX_SLOTS 1024u           /* senders a receiver deduplicates for */
#define ATX_DEDUP_WIN 16384u          /* sequence numbers remembered per sender */
/* control messages: 1-byte kind, then the payload */
enum { MSG_USER = 0, MSG_HELLO = 1, MSG_HELLO_ACK = 2, MSG_PROBE = 3 };
enum { SLOT_NONE = -1, SLOT_WAIT = -2 };
#define ATX_NO_SLOT 0xffffu           /* MSG_HELLO_ACK: the receiver has no slot for us */

/* ------------------------------------------------------------------ ops */

enum {
    OP_WRITE = 1, OP_PAGED, OP_SCATTER, OP_SEND,
    CMD_MR_REG, CMD_MR_DEREG, CMD_PEER_INSERT, CMD_DEST_ADD,
};

enum { CTX_TX = 1, CTX_RX = 2 };

struct atx_op;

typedef struct atx_ctx {
    struct fi_context2 fictx;        /* must be first */
    int kind;
    struct atx_op *op;                /* CTX_TX */
    uint64_t bytes;                   /* CTX_TX: payload of this WR */
    uint64_t peer;                    /* CTX_TX: its peer */
    uint64_t wr;                      /* CTX_TX: the op's WR index (ATX_WR_TAIL) */
    uint64_t data;                    /* CTX_TX: CQ data sent (with its token) */
    char *src;                        /* CTX_TX: base of the source region, or NULL */
    int abandoned;                    /* CTX_TX: its lane went down; the op moved on */
    int probe;                        /* CTX_TX: a lane probe (no op) */
    int used;                         /* CTX_TX: handed to the provider */
    char *buf;                        /* CTX_RX: receive buffer */
    struct atx_ctx *next_free;
} atx_ctx;

typedef struct atx_cmd {
    int rc;
    char err[ATX_ERRLEN];
    /* arguments */
    void *addr; size_t len; int remote_read; atx_mr *mr;
    int nnames; const void *const *names; const size_t *lens; uint64_t peer;
    const uint64_t *bases, *keys;
    uint64_t engine_id;
} atx_cmd;

/* A peer: its NICs pair with ours as lanes (see atx.h).  route[l] lists
 * the peer's NICs our NIC l talks to; fa[l][r] is r's address in l's AV. */
typedef struct atx_peer {
    int nremote;
    uint64_t last_ok;                 /* last successful completion of a WR to it */
    uint64_t engine_id;               /* from its address */
    int slot;                         /* our slot at the peer (tokens); SLOT_WAIT: hello
                                       * sent, no answer yet; SLOT_NONE: no tokens */
    uint64_t hello_at;                /* when the hello went out */
    uint64_t skip_pass;               /* post_pending pass it held up */
    uint64_t eagain_at[ATX_MAX_NICS]; /* NIC's poll count + 1 when the provider pushed back
                                       * on this peer: no retry there before a poll */
    uint16_t seq;                     /* next token sequence number */
    /* lanes by our NIC: work requests in flight, last progress, state */
    uint32_t lane_inflight[ATX_MAX_NICS];
    uint64_t lane_since[ATX_MAX_NICS];
    uint8_t down[ATX_MAX_NICS];
    uint8_t probing[ATX_MAX_NICS];
    uint64_t down_at[ATX_MAX_NICS];
    uint64_t probe_at[ATX_MAX_NICS];
    const void *names[ATX_MAX_NICS];  /* its raw endpoint names (re-insertion) */
    int nroute[ATX_MAX_NICS];
    uint8_t route[ATX_MAX_NICS][ATX_MAX_NICS];
    uint32_t rr[ATX_MAX_NICS];
    fi_addr_t fa[ATX_MAX_NICS][ATX_MAX_NICS];
    atx_keytab *keytab;               /* shm: its key table, for the copy lane */
    int keytab_state;                 /* 0: not looked for, 1: mapped, -1: none */
} atx_peer;

/* A sender known to this receiver (by its MSG_HELLO): the tokens of its
 * immediates are deduplicated over a window of sequence numbers, so an
 * immediate re-sent over another lane is counted once. */
typedef struct atx_slot {
    uint64_t engine_id;
    uint16_t hi;                      /* highest sequence number seen */
    int seen_any;
    uint8_t bits[ATX_DEDUP_WIN / 8];  /* seen, by sequence number mod window */
} atx_slot;

/* A remote region: (base, key) per NIC of its owner. */
typedef struct atx_dest {
    uint64_t peer;
    uint64_t base[ATX_MAX_NICS];
    uint64_t key[ATX_MAX_NICS];
} atx_dest;

typedef struct atx_op {
    struct atx_op *next;              /* sub_q / post_q link */
    struct atx_op *lprev, *lnext;     /* live list */
    uint64_t id;
    int type;
    int nic;                          /* the NIC of its first WR (statistics) */
    /* source */
    char *src;                        /* base address of the source region */
    void *src_desc[ATX_MAX_NICS];     /* the source's descriptor per NIC */
    /* OP_WRITE */
    uint64_t src_off, dst_off, len, chunk;
    uint64_t dest;                    /* OP_WRITE/OP_PAGED: destination id */
    /* OP_PAGED */
    int64_t *src_pages, *dst_pages;
    uint64_t src_stride, dst_stride, page_size;
    /* OP_SCATTER */
    atx_scatter_entry *entries;
    /* OP_SEND */
    char *msg; size_t msglen; uint64_t peer; struct fid_mr *msg_mr;
    /* immediates */
    int has_imm; uint32_t imm;
    int tail_imm;                     /* 0 none, 1 waiting for data, 2 ready, 3 posted */
    int copy_nic;                     /* 1 + the copy lane its data went over (0: none) */
    /* progress */
    uint64_t nwr, next_wr, inflight;
    uint64_t bytes;
    int in_post_q;
    int reported;                     /* its record went out early (stalled peer) */
    int internal;                     /* an engine message: no record */
    /* work requests to post again (their lane went down): WR index + CQ data */
    struct { uint64_t wr, data; } *retry;
    uint32_t nretry, retry_cap;
    uint64_t t_start;                 /* submitted */
    int status, prov_errno;
    char *errtext;
} atx_op;

typedef struct atx_waiter {
    struct atx_waiter *next;
    uint64_t id, need;
} atx_waiter;

typedef struct atx_counter {
    uint32_t imm;
    int used;
    uint32_t pins;                     /* live ImmCounter views of this value */
    uint64_t avail, total;
    atx_waiter *head, *tail;
} atx_counter;

typedef struct atx_nic {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_ep *ep;
    struct fid_cq *cq;
    struct fid_av *av;
    int cq_fd;                        /* -1: must be polled */
    /* With 8 bytes of CQ data, bit 32 marks a user immediate; writes
     * without one may carry data 0 (an activity marker, see post_one). */
    uint64_t imm_flag;
    atx_nic_info pub;
    /* receive buffers */
    char *rx_block;
    struct fid_mr *rx_mr;
    void *rx_desc;
    atx_ctx *rx_ctx;
    int rx_count;
    /* transmit contexts */
    atx_ctx *tx_ctx;
    atx_ctx *tx_free;
    size_t tx_depth, tx_used;
    int tx_blocked;                   /* -FI_EAGAIN seen: no retry before a CQ poll */
    uint64_t inflight_bytes;          /* payload posted, not completed */
    uint64_t weight;                  /* selector share; 0: not chosen */
    atx_stats stats;
} atx_nic;

/* The shm watch's view of one of our own regions (own_watch). */
typedef struct atx_own_region {
    void *head;                       /* the mapped region (NULL: not watched) */
    uint64_t moves;                   /* its command queue's counts, last look */
    uint64_t since;                   /* seen taken and still since (0: not) */
    uint64_t call;                    /* ...with this call of ours inside (0: none) */
    pid_t tid;                        /* ...by this thread */
    uint64_t ut, st;                  /* ...whose CPU times were these */
} atx_own_region;

/* The engine's record of one registration, in C memory (an atx_mr lives in
 * its Python object): what shutdown_worker closes before the endpoints on
 * tcp, and what atx_engine_destroy closes if a region was never
 * deregistered.  A fid closed here is NULL, and do_mr_dereg skips it. */
typedef struct atx_reg {
    struct atx_reg *prev, *next;
    int nnics;
    struct fid_mr *fid[ATX_MAX_NICS];
} atx_reg;

struct atx_engine {
    atx_config cfg;
    char provider[64];
    int nnics;                        /* endpoints: NIC d's endpoint k is nics[d * eps + k] */
    int ndoms;                        /* distinct NICs (domains) */
    atx_nic nics[ATX_MAX_NICS];

    pthread_t thread;
    int thread_started;
    pthread_mutex_t join_lock;         /* atx_engine_stop from several threads */
    int stop;                          /* atomic */

    /* The progress lock serializes every libfabric call and the op state
     * below (FI_THREAD_DOMAIN).  The worker holds it for rounds of progress;
     * an application thread takes it to post its operation inline (no
     * thread hop), polling the CQ only when the provider pushes back. */
    pthread_mutex_t prog_lock;
    uint64_t app_ts;                   /* last inline progress by the app */
    uint64_t call_since;               /* a thread is inside a post or poll since (0: none) */
    pid_t inside_tid;                  /* ... that thread */
    uint64_t unstick_at;               /* last look for dead shm lock holders */
    /* shm: our own regions, as the watch sees them (own_watch) */
    atx_own_region own[ATX_MAX_NICS];
    int is_shm;                        /* the shm provider (its posts can spin on a peer) */
    int dead;                          /* endpoints closed: no more posting */

    /* the worker's sleep: it announces it (seq_cst) and re-checks
     * `submitted`; a poster bumps `submitted` and then reads `sleeping` */
    int sleeping;
    uint64_t submitted;
    int app_polling;                   /* the app thread polls: stand back, no wake-ups */
    int app_inside;                    /* app threads inside a poll or a post right now */
    uint64_t app_work_ts;              /* the app's polling last found work */
    uint64_t app_gap;                  /* typical time between its finds (EWMA) */
    int app_inflight;                  /* at its last poll, work requests were in flight */
    int wake_fd;

    /* worker-private */
    atx_op *post_head, *post_tail;
    atx_op *live;
    atx_peer *peers;
    size_t npeers, peers_cap;
    atx_dest *dests;
    size_t ndests, dests_cap;
    unsigned rr_nic;                   /* selector's round-robin start */
    uint64_t pass;                     /* post_pending passes */
    uint64_t last_scan;                /* last look for stalled operations */
    uint64_t now;                      /* time of the current CQ poll */
    /* deduplication of immediates re-sent over another lane */
    struct atx_slot *slots;
    size_t nslots;
    char hello[1 + 8 + 1 + ATX_MAX_NICS * (2 + 256)];   /* our MSG_HELLO */
    size_t hello_len;
    size_t rx_size;                    /* receive buffer: kind byte + msg_size, >= a hello */
    atx_record *batch;
    size_t batch_n, batch_cap;

    /* completion records */
    pthread_mutex_t rec_lock;
    atx_record *recs;
    size_t rec_head, rec_n, rec_cap;
    int notified;
    uint64_t deferred;                 /* when a wake-up was first held back, 0: none */
    uint64_t coalesce_ns;              /* hold a wake-up back at most this long */
    size_t max_counters;               /* distinct immediate values a peer may create */
    int batch_urgent;                  /* the batch holds a waiter or message record */
    int notify_fd;

    uint64_t spin_ns;                  /* keep polling this long after activity */
    atx_reg *regs;                     /* registered regions (under prog_lock) */
    atx_keytab *keytab;                /* shm: our regions peers may copy into */
    int regions_first;                 /* shutdown closes the regions before the endpoints */
    uint64_t copy_min;                 /* the smallest write the shm copy lane takes */
    /* immediate counters */
    pthread_mutex_t imm_lock;
    atx_counter *ctab;
    size_t ctab_cap, ctab_used;
    uint32_t ctab_key;                 /* keys ctab_home */
    size_t ctab_keep;                  /* idle counters kept: min(ATX_CTAB_KEEP, max/2) */
};

const char *atx_strerror(int err) { return fi_strerror(err < 0 ? -err : err); }

/* Opening and closing libfabric objects is serialized across the engines of
 * a process: libfabric 1.17's tcp provider crashed (inside fi_close of an
 * endpoint) when two engines of one process closed or opened endpoints at
 * the same time (seen here; the domains are FI_THREAD_DOMAIN, which covers
 * one domain, not provider-wide state).  The crash in fi_close of a target
 * that a peer streams into is another: see close_regions_then_settle. */
static pthread_mutex_t g_lifecycle_lock = PTHREAD_MUTEX_INITIALIZER;

/* Pollers keep polling for a while after the last completion (or arrival):
 * at least their base window, and 4 typical gaps between completions, so
 * that large writes (one completion every few hundred microseconds) do not
 * send a poller to sleep between them. */
static inline void gap_note(uint64_t *last, uint64_t *ewma, uint64_t t) {
    uint64_t g = t - *last;
    if (g > ATX_GAP_CAP_NS) g = ATX_GAP_CAP_NS;
    *ewma = (*ewma * 7 + g) / 8;
    *last = t;
}

static inline uint64_t gap_window(uint64_t base, uint64_t ewma) {
    uint64_t w = 4 * ewma;
    if (w > ATX_GAP_WIN_MAX_NS) w = ATX_GAP_WIN_MAX_NS;
    return w > base ? w : base;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void seterr(char *err, size_t errlen, const char *what, int rc) {
    if (err && errlen)
        snprintf(err, errlen, "%s: %s (%d)", what, fi_strerror(rc < 0 ? -rc : rc), rc);
}

static void fd_signal(int fd) {
    uint64_t one = 1;
    ssize_t w = write(fd, &one, sizeof(one));
    (void)w;
}

/* ------------------------------------------------------------ records */

static void batch_push(atx_engine *e, const atx_record *r) {
    if (e->batch_n == e->batch_cap) {
        size_t cap = e->batch_cap ? e->batch_cap * 2 : 256;
        atx_record *nb = realloc(e->batch, cap * sizeof(*nb));
        if (!nb) abort();
        e->batch = nb;
        e->batch_cap = cap;
    }
    e->batch[e->batch_n++] = *r;
    if (r->kind != ATX_REC_OP) e->batch_urgent = 1;
}

/* Append records to the shared queue; wake the loop once per burst.
 * Not urgent (completions of writes while more are in flight): the wake-up
 * may be held back up to coalesce_ns, or until ATX_COALESCE_MAX records
 * wait, so that one wake-up resolves many futures. */
static void rec_publish(atx_engine *e, const atx_record *r, size_t n, int urgent) {
    int wake = 0;
    if (!n) return;
    pthread_mutex_lock(&e->rec_lock);
    if (e->rec_head && e->rec_head == e->rec_n) e->rec_head = e->rec_n = 0;
    if (e->rec_n + n > e->rec_cap) {
        if (e->rec_head) {
            memmove(e->recs, e->recs + e->rec_head, (e->rec_n - e->rec_head) * sizeof(*r));
            e->rec_n -= e->rec_head;
            e->rec_head = 0;
        }
        if (e->rec_n + n > e->rec_cap) {
            size_t cap = e->rec_cap ? e->rec_cap : 1024;
            while (cap < e->rec_n + n) cap *= 2;
            atx_record *nr = realloc(e->recs, cap * sizeof(*nr));
            if (!nr) abort();
            e->recs = nr;
            e->rec_cap = cap;
        }
    }
    memcpy(e->recs + e->rec_n, r, n * sizeof(*r));
    e->rec_n += n;
    /* the app polls: its poller drains the records (it re-checks after it
     * stops polling, under rec_lock), so no wake-up */
    if (!e->notified && !__atomic_load_n(&e->app_polling, __ATOMIC_SEQ_CST)) {
        if (urgent || !e->coalesce_ns || e->rec_n - e->rec_head >= ATX_COALESCE_MAX) {
            e->notified = 1;
            e->deferred = 0;
            wake = 1;
        } else if (!e->deferred) {
            e->deferred = now_ns();
        }
    }
    pthread_mutex_unlock(&e->rec_lock);
    if (wake) fd_signal(e->notify_fd);
}

static void batch_flush(atx_engine *e) {
    int urgent = e->batch_urgent || e->post_head == NULL;
    for (int i = 0; i < e->nnics && urgent && !e->batch_urgent; i++)
        if (e->nics[i].tx_used) urgent = 0;   /* more completions are coming */
    rec_publish(e, e->batch, e->batch_n, urgent);
    e->batch_n = 0;
    e->batch_urgent = 0;
}

/* Wake the loop for records held back long enough (or now, if force). */
static void rec_notify_due(atx_engine *e, int force) {
    int wake = 0;
    if (!__atomic_load_n(&e->deferred, __ATOMIC_RELAXED)) return;
    if (__atomic_load_n(&e->app_polling, __ATOMIC_SEQ_CST)) return;   /* its poller drains */
    pthread_mutex_lock(&e->rec_lock);
    if (!e->notified && e->deferred && (force || now_ns() - e->deferred >= e->coalesce_ns)) {
        e->notified = 1;
        e->deferred = 0;
        wake = 1;
    }
    pthread_mutex_unlock(&e->rec_lock);
    if (wake) fd_signal(e->notify_fd);
}

int atx_pending(atx_engine *e) {
    int n;
    pthread_mutex_lock(&e->rec_lock);
    n = e->rec_n > e->rec_head;
    pthread_mutex_unlock(&e->rec_lock);
    return n;
}

void atx_notify_clear(atx_engine *e) {
    uint64_t v;
    ssize_t r = read(e->notify_fd, &v, sizeof(v));
    (void)r;
}

size_t atx_drain(atx_engine *e, atx_record *out, size_t max) {
    size_t n;
    pthread_mutex_lock(&e->rec_lock);
    n = e->rec_n - e->rec_head;
    if (n > max) n = max;
    memcpy(out, e->recs + e->rec_head, n * sizeof(*out));
    e->rec_head += n;
    if (e->rec_head == e->rec_n) {
        e->rec_head = e->rec_n = 0;
        e->notified = 0;
        e->deferred = 0;
    }
    pthread_mutex_unlock(&e->rec_lock);
    return n;
}

/* ----------------------------------------------------- immediate counters */

/* A keyed mix (murmur3's finaliser of imm ^ a per-engine random key), so
 * that a peer choosing values cannot pile them onto one probe run. */
static size_t ctab_home(const atx_engine *e, uint32_t imm, size_t mask) {
    uint32_t h = imm ^ e->ctab_key;
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h & mask;
}

/* With imm_lock held: rehash into a table of cap slots (a power of two). */
static void ctab_resize(atx_engine *e, size_t cap) {
    atx_counter *old = e->ctab;
    size_t oc = e->ctab_cap, mask = cap - 1, i, j;
    e->ctab = calloc(cap, sizeof(atx_counter));
    if (!e->ctab) abort();
    e->ctab_cap = cap;
    for (j = 0; j < oc; j++) {
        if (!old[j].used) continue;
        i = ctab_home(e, old[j].imm, mask);
        while (e->ctab[i].used) i = (i + 1) & mask;
        e->ctab[i] = old[j];
    }
    free(old);
}

static atx_counter *ctab_find(atx_engine *e, uint32_t imm, int create) {
    size_t mask, i;
    if (e->ctab_cap == 0 && !create) return NULL;
    if (create && (e->ctab_used + 1) * 2 > e->ctab_cap)
        ctab_resize(e, e->ctab_cap ? e->ctab_cap * 2 : 64);
    mask = e->ctab_cap - 1;
    i = ctab_home(e, imm, mask);
    while (e->ctab[i].used) {
        if (e->ctab[i].imm == imm) return &e->ctab[i];
        i = (i + 1) & mask;
    }
    if (!create) return NULL;
    e->ctab[i].used = 1;
    e->ctab[i].imm = imm;
    e->ctab_used++;
    return &e->ctab[i];
}

/* With imm_lock held: forget counter c if it is idle (nothing to consume, no
 * waiter, no ImmCounter view) and the table holds more than ctab_keep values
 * (ATX_CTAB_KEEP, or half the bound on values if that is less), so that an
 * application naming a new value per request (or a peer sending many) does
 * not fill the table for good.  Only the value's total is lost.
 * Linear probing: delete by shifting back the entries of the probe run that
 * follows (no tombstones).  Pointers into the table are invalid afterwards. */
static void ctab_drop_if_idle(atx_engine *e, atx_counter *c) {
    size_t mask, i, j, k;
    if (!c || c->avail || c->head || c->pins || e->ctab_used <= e->ctab_keep) return;
    mask = e->ctab_cap - 1;
    i = j = (size_t)(c - e->ctab);
    for (;;) {
        j = (j + 1) & mask;
        if (!e->ctab[j].used) break;
        k = ctab_home(e, e->ctab[j].imm, mask);
        /* entry j may fill hole i unless its home lies cyclically in (i, j] */
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
        e->ctab[i] = e->ctab[j];
        i = j;
    }
    memset(&e->ctab[i], 0, sizeof(atx_counter));
    e->ctab_used--;
    /* give back the memory of a burst of values once it is over */
    if (e->ctab_cap > 4 * ATX_CTAB_KEEP && e->ctab_used * 8 < e->ctab_cap)
        ctab_resize(e, e->ctab_cap / 2);
}

/* With imm_lock held: fire waiters whose threshold is met. */
static void counter_fire(atx_engine *e, atx_counter *c, atx_record *out, size_t *nout,
                         size_t max) {
    (void)e;
    while (c->head && c->avail >= c->head->need && *nout < max) {
        atx_waiter *w = c->head;
        c->avail -= w->need;
        c->head = w->next;
        if (!c->head) c->tail = NULL;
        memset(&out[*nout], 0, sizeof(atx_record));
        out[*nout].id = w->id;
        out[*nout].kind = ATX_REC_WAITER;
        out[*nout].bytes = w->need;
        (*nout)++;
        free(w);
    }
}

static void imm_arrived(atx_engine *e, atx_nic *nic, uint32_t imm) {
    atx_record fired[8];
    size_t n;
    atx_counter *c;
    pthread_mutex_lock(&e->imm_lock);
    /* peers choose the values: bound the table they can make us grow */
    c = ctab_find(e, imm, e->ctab_used < e->max_counters);
    if (!c) {
        nic->stats.imms_dropped++;
        pthread_mutex_unlock(&e->imm_lock);
        return;
    }
    c->avail++;
    c->total++;
    do {
        n = 0;
        counter_fire(e, c, fired, &n, 8);
        for (size_t i = 0; i < n; i++) batch_push(e, &fired[i]);
    } while (n == 8);
    ctab_drop_if_idle(e, c);
    pthread_mutex_unlock(&e->imm_lock);
}

int atx_imm_expect(atx_engine *e, uint32_t imm, uint64_t need, uint64_t id) {
    int rc = 0;
    atx_counter *c;
    pthread_mutex_lock(&e->imm_lock);
    c = ctab_find(e, imm, 1);
    if (!c->head && c->avail >= need) {
        c->avail -= need;
        rc = 1;
        ctab_drop_if_idle(e, c);
    } else {
        atx_waiter *w = malloc(sizeof(*w));
        if (!w) abort();
        w->next = NULL;
        w->id = id;
        w->need = need;
        if (c->tail) c->tail->next = w; else c->head = w;
        c->tail = w;
    }
    pthread_mutex_unlock(&e->imm_lock);
    return rc;
}

int atx_imm_cancel(atx_engine *e, uint32_t imm, uint64_t id) {
    int found = 0;
    atx_counter *c;
    atx_record fired[64];
    size_t n = 0;
    pthread_mutex_lock(&e->imm_lock);
    c = ctab_find(e, imm, 0);
    if (c) {
        atx_waiter **pp = &c->head, *prev = NULL;
        while (*pp) {
            if ((*pp)->id == id) {
                atx_waiter *w = *pp;
                *pp = w->next;
                if (c->tail == w) c->tail = prev;
                free(w);
                found = 1;
                break;
            }
            prev = *pp;
            pp = &(*pp)->next;
        }
        /* removing the head may let the next waiter fire */
        if (found) counter_fire(e, c, fired, &n, 64);
        ctab_drop_if_idle(e, c);
    }
    pthread_mutex_unlock(&e->imm_lock);
    rec_publish(e, fired, n, 1);
    return found;
}

void atx_imm_credit(atx_engine *e, uint32_t imm, uint64_t nback) {
    atx_counter *c;
    atx_record fired[64];
    size_t n = 0;
    pthread_mutex_lock(&e->imm_lock);
    c = ctab_find(e, imm, 1);
    c->avail += nback;
    counter_fire(e, c, fired, &n, 64);
    ctab_drop_if_idle(e, c);
    pthread_mutex_unlock(&e->imm_lock);
    rec_publish(e, fired, n, 1);
}

void atx_imm_pin(atx_engine *e, uint32_t imm, int pin) {
    atx_counter *c;
    pthread_mutex_lock(&e->imm_lock);
    c = ctab_find(e, imm, pin > 0);
    if (c && pin > 0) {
        c->pins++;
    } else if (c && c->pins) {
        c->pins--;
        ctab_drop_if_idle(e, c);
    }
    pthread_mutex_unlock(&e->imm_lock);
}

size_t atx_imm_values(atx_engine *e) {
    size_t n;
    pthread_mutex_lock(&e->imm_lock);
    n = e->ctab_used;
    pthread_mutex_unlock(&e->imm_lock);
    return n;
}

void atx_imm_value(atx_engine *e, uint32_t imm, uint64_t *avail, uint64_t *total) {
    atx_counter *c;
    pthread_mutex_lock(&e->imm_lock);
    c = ctab_find(e, imm, 0);
    *avail = c ? c->avail : 0;
    *total = c ? c->total : 0;
    pthread_mutex_unlock(&e->imm_lock);
}

/* --------------------------------------------------------- submission */

static void wake_worker(atx_engine *e) { fd_signal(e->wake_fd); }

/* Something was posted or the app stopped polling: the worker must look. */
static void kick_worker(atx_engine *e) {
    __atomic_add_fetch(&e->submitted, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&e->sleeping, __ATOMIC_SEQ_CST) &&
        !__atomic_load_n(&e->app_polling, __ATOMIC_SEQ_CST))
        wake_worker(e);
}

static void accept_op(atx_engine *e, atx_op *op);
static size_t post_pending(atx_engine *e);
static size_t poll_cq(atx_engine *e, struct atx_nic *n, int rounds);
static void batch_flush(atx_engine *e);

/* Do the op's destinations (or peer) exist?  Called under prog_lock. */
static int op_targets_valid(const atx_engine *e, const atx_op *op) {
    switch (op->type) {
    case OP_WRITE:
    case OP_PAGED:
        return op->dest < e->ndests;
    case OP_SCATTER:
        for (uint64_t i = 0; i < op->nwr; i++)
            if (op->entries[i].dest >= e->ndests) return 0;
        return 1;
    case OP_SEND:
        return op->peer < e->npeers;
    default:
        return 0;
    }
}

/* shm engines' posts and polls can spin for ever on a region lock left
 * taken by a process that died holding it (see shm_unstick.c); whichever
 * thread of the engine is inside that call (the app's or the worker) cannot
 * get out by itself.  One watch thread per process looks, every
 * ATX_STUCK_NS, at the shm engines that are open: at their own regions
 * (own_watch), and, for one whose call has been inside the provider for
 * ATX_STUCK_NS, at its peers' regions, releasing the locks of dead owners.
 * It runs while a shm engine is open (20 wake-ups a second) and exits with
 * the last one. */
static pthread_mutex_t g_watch_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_watch_cond = PTHREAD_COND_INITIALIZER;
static atx_engine **g_watch;                 /* open shm engines */
static size_t g_watch_n, g_watch_cap;
static int g_watch_running;

static pid_t my_tid(void) {
    static __thread pid_t tid;
    if (!tid) tid = (pid_t)syscall(SYS_gettid);
    return tid;
}

/* Around every post and CQ read: the watch's view of a call that does not
 * return (and of the thread inside it). */
static inline void call_enter(atx_engine *e) {
    __atomic_store_n(&e->inside_tid, my_tid(), __ATOMIC_RELAXED);
    __atomic_store_n(&e->call_since, e->now | 1, __ATOMIC_RELAXED);   /* never 0 */
}
static inline void call_exit(atx_engine *e) {
    __atomic_store_n(&e->call_since, 0, __ATOMIC_RELAXED);
}

/* A thread's user and system CPU time, in clock ticks (0, or -1). */
static int thread_times(pid_t tid, uint64_t *ut, uint64_t *st) {
    char path[64], buf[1024], *p;
    unsigned long long u, s;
    FILE *f;
    size_t n;
    snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
    if (!(f = fopen(path, "re"))) return -1;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    if (!(p = strrchr(buf, ')'))) return -1;
    /* after "(comm)": state, then fields 4..13, then utime (14) and stime (15) */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &u, &s) != 2)
        return -1;
    *ut = u;
    *st = s;
    return 0;
}

/* Our own regions' locks, left taken by a writer that died holding them
 * (see shm_unstick.c): each looked at on every watch tick; released once
 * seen taken for ATX_OWN_STUCK_NS with the command queue still, the
 * engine's thread (if one is inside a provider call all that time)
 * spinning in user mode, and a peer process gone. */
static void own_watch(atx_engine *e, uint64_t t) {
    uint64_t since = __atomic_load_n(&e->call_since, __ATOMIC_RELAXED);
    pid_t tid = __atomic_load_n(&e->inside_tid, __ATOMIC_RELAXED);
    for (int i = 0; i < e->nnics; i++) {
        atx_own_region *r = &e->own[i];
        uint64_t moves, ut = 0, st = 0, ticks;
        int taken;
        if (!r->head) continue;
        taken = atx_shm_region_taken(r->head, &moves);
        if (!taken || moves != r->moves || (since && thread_times(tid, &ut, &st))) {
            r->moves = moves;
            r->since = 0;
            continue;
        }
        if (!r->since || (since && (since != r->call || tid != r->tid))) {
            /* a new window: taken and still from now on */
            r->since = t;
            r->call = since;
            r->tid = tid;
            r->ut = ut;
            r->st = st;
            continue;
        }
        if (t < r->since + ATX_OWN_STUCK_NS) continue;
        ticks = (t - r->since) * (uint64_t)sysconf(_SC_CLK_TCK) / 1000000000ULL;
        r->since = 0;   /* a new window after this one, whatever it shows */
        if (r->call && (st - r->st > 1 || (ut - r->ut) * 4 < ticks)) continue;   /* ours copies */
        if (!atx_shm_dead_peer()) continue;
        if (atx_shm_release_region(r->head))
            __atomic_add_fetch(&e->nics[0].stats.locks_released, 1, __ATOMIC_RELAXED);
    }
}

static void unstick_if_stuck(atx_engine *e, uint64_t t) {
    uint64_t since = __atomic_load_n(&e->call_since, __ATOMIC_RELAXED);
    int n;
    own_watch(e, t);
    if (!since || t < since + ATX_STUCK_NS || t < e->unstick_at + ATX_STUCK_NS) return;
    e->unstick_at = t;
    n = atx_shm_unstick();
    if (n) __atomic_add_fetch(&e->nics[0].stats.locks_released, (uint64_t)n, __ATOMIC_RELAXED);
}

static void *watch_main(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "atx-shm-watch");
    pthread_mutex_lock(&g_watch_lock);
    while (g_watch_n > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += (long)ATX_STUCK_NS;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&g_watch_cond, &g_watch_lock, &ts);
        for (size_t i = 0; i < g_watch_n; i++) unstick_if_stuck(g_watch[i], now_ns());
    }
    g_watch_running = 0;
    pthread_mutex_unlock(&g_watch_lock);
    return NULL;
}

/* fork: the lock is held across it, and the child, which has no watch
 * thread and only copies of the parent's engines, starts with none */
static void watch_before_fork(void) { pthread_mutex_lock(&g_watch_lock); }
static void watch_parent_fork(void) { pthread_mutex_unlock(&g_watch_lock); }
static void watch_child_fork(void) {
    g_watch_n = 0;
    g_watch_running = 0;
    pthread_mutex_unlock(&g_watch_lock);
}

static void watch_atfork(void) {
    pthread_atfork(watch_before_fork, watch_parent_fork, watch_child_fork);
}

/* Watch shm engine e (0, or an errno). */
static int watch_add(atx_engine *e) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    int rc = 0;
    pthread_once(&once, watch_atfork);
    pthread_mutex_lock(&g_watch_lock);
    if (g_watch_n == g_watch_cap) {
        size_t cap = g_watch_cap ? g_watch_cap * 2 : 8;
        atx_engine **w = realloc(g_watch, cap * sizeof(*w));
        if (!w) {
            pthread_mutex_unlock(&g_watch_lock);
            return ENOMEM;
        }
        g_watch = w;
        g_watch_cap = cap;
    }
    g_watch[g_watch_n++] = e;
    if (!g_watch_running) {
        pthread_attr_t attr;
        pthread_t th;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        rc = pthread_create(&th, &attr, watch_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc) g_watch_n--;
        else g_watch_running = 1;
    }
    pthread_mutex_unlock(&g_watch_lock);
    return rc;
}

static void watch_remove(atx_engine *e) {
    pthread_mutex_lock(&g_watch_lock);
    for (size_t i = 0; i < g_watch_n; i++) {
        if (g_watch[i] == e) {
            g_watch[i] = g_watch[--g_watch_n];
            break;
        }
    }
    pthread_cond_signal(&g_watch_cond);   /* the last one gone: the watch exits */
    pthread_mutex_unlock(&g_watch_lock);
}

static int submit(atx_engine *e, atx_op *op) {
    size_t posted;
    int room;
    /* Post inline from the caller's thread: the worker holds the lock only
     * for short rounds of progress, and never needs the caller's GIL. */
    pthread_mutex_lock(&e->prog_lock);
    if (e->dead) {
        pthread_mutex_unlock(&e->prog_lock);
        return -FI_ESHUTDOWN;
    }
    if (!op_targets_valid(e, op)) {
        pthread_mutex_unlock(&e->prog_lock);
        return -FI_EINVAL;
    }
    __atomic_add_fetch(&e->app_inside, 1, __ATOMIC_RELAXED);
    e->now = now_ns();
    op->t_start = e->now;
    accept_op(e, op);
    posted = post_pending(e);
    room = 0;
    for (int i = 0; i < e->nnics; i++) room |= e->nics[i].tx_free != NULL;
    if (posted == 0 && e->post_head && room) {
        /* the provider refused (-FI_EAGAIN, now or before the NIC's last
         * poll; shm refuses about once a write): progress once, then try
         * again.  Not when our own depth is reached on every NIC: the op
         * waits in the queue for the loop's next poll, and
         * write() stays cheap (on tcp one progress call can copy a
         * megabyte into a socket: 2000 writes at depth 2 held the loop for
         * 0.4-0.7 s and most of them completed before the caller could
         * act) */
        for (int i = 0; i < e->nnics; i++) poll_cq(e, &e->nics[i], 1);
        post_pending(e);
    }
    batch_flush(e);
    __atomic_store_n(&e->app_ts, now_ns(), __ATOMIC_RELAXED);
    __atomic_sub_fetch(&e->app_inside, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&e->prog_lock);
    kick_worker(e);
    return 0;
}

static atx_op *op_new(int type, uint64_t id) {
    atx_op *op = calloc(1, sizeof(*op));
    if (!op) return NULL;
    op->type = type;
    op->id = id;
    return op;
}

static void op_src(atx_engine *e, atx_op *op, const atx_mr *src) {
    op->src = src ? (char *)src->addr : NULL;
    if (src) memcpy(op->src_desc, src->desc, (size_t)e->nnics * sizeof(void *));
}

static void op_free(atx_op *op) {
    free(op->retry);
    free(op->src_pages);
    free(op->dst_pages);
    free(op->entries);
    free(op->msg);
    free(op->errtext);
    free(op);
}

int atx_post_write(atx_engine *e, uint64_t id, const atx_mr *src, uint64_t src_off,
                   uint64_t dest, uint64_t dst_off, uint64_t len, int has_imm,
                   uint32_t imm) {
    atx_op *op = op_new(OP_WRITE, id);
    int rc;
    if (!op) return -FI_ENOMEM;
    op_src(e, op, src);
    op->src_off = src_off;
    op->dest = dest;
    op->dst_off = dst_off;
    op->len = len;
    op->has_imm = has_imm;
    op->imm = imm;
    op->chunk = e->cfg.max_chunk;
    /* several NICs: stripes, so that every NIC takes a share (the
     * endpoints of one NIC share its link: whole writes spread over them) */
    if (e->ndoms > 1 && len > e->cfg.stripe && op->chunk > e->cfg.stripe)
        op->chunk = e->cfg.stripe;
    if (len == 0)
        op->nwr = has_imm ? 1 : 0;
    else
        op->nwr = (len + op->chunk - 1) / op->chunk;
    if (has_imm && op->nwr > 1) op->tail_imm = 1;
    rc = submit(e, op);
    if (rc) op_free(op);
    return rc;
}

int atx_post_paged(atx_engine *e, uint64_t id, const atx_mr *src, uint64_t src_off,
                   uint64_t src_stride, int64_t *src_pages, uint64_t dest,
                   uint64_t dst_off, uint64_t dst_stride, int64_t *dst_pages, uint64_t npages,
                   uint64_t page_size, int has_imm, uint32_t imm) {
    atx_op *op = op_new(OP_PAGED, id);
    int rc;
    if (!op) {
        free(src_pages);
        free(dst_pages);
        return -FI_ENOMEM;
    }
    op_src(e, op, src);
    op->src_off = src_off;
    op->src_stride = src_stride;
    op->src_pages = src_pages;
    op->dest = dest;
    op->dst_off = dst_off;
    op->dst_stride = dst_stride;
    op->dst_pages = dst_pages;
    op->nwr = npages;
    op->page_size = page_size;
    op->has_imm = has_imm;
    op->imm = imm;
    rc = submit(e, op);
    if (rc) op_free(op);
    return rc;
}

int atx_post_scatter(atx_engine *e, uint64_t id, const atx_mr *src, atx_scatter_entry *ent,
                     uint64_t n, int has_imm, uint32_t imm) {
    atx_op *op = op_new(OP_SCATTER, id);
    int rc;
    if (!op) {
        free(ent);
        return -FI_ENOMEM;
    }
    op_src(e, op, src);
    op->entries = ent;
    op->nwr = n;
    op->has_imm = has_imm;
    op->imm = imm;
    rc = submit(e, op);
    if (rc) op_free(op);
    return rc;
}

/* A control message: kind byte, then the payload. */
static atx_op *msg_op(uint64_t id, uint64_t peer, int kind, const void *data, size_t len) {
    atx_op *op = op_new(OP_SEND, id);
    if (!op) return NULL;
    op->msg = malloc(len + 1);
    if (!op->msg) {
        free(op);
        return NULL;
    }
    op->msg[0] = (char)kind;
    if (len) memcpy(op->msg + 1, data, len);
    op->msglen = len + 1;
    op->peer = peer;
    op->nwr = 1;
    return op;
}

int atx_post_send(atx_engine *e, uint64_t id, uint64_t peer, const void *data, size_t len) {
    atx_op *op = msg_op(id, peer, MSG_USER, data, len);
    int rc;
    if (!op) return -FI_ENOMEM;
    rc = submit(e, op);
    if (rc) op_free(op);
    return rc;
}

/* An engine message (hello, ack), posted under prog_lock; no record. */
static int post_internal_send(atx_engine *e, uint64_t peer, int kind, const void *payload,
                              size_t len) {
    atx_op *op = msg_op(0, peer, kind, payload, len);
    if (!op) return -FI_ENOMEM;
    op->internal = 1;
    op->t_start = now_ns();
    accept_op(e, op);
    return 0;
}

static void do_mr_dereg(atx_engine *e, atx_cmd *cmd);

static void do_mr_reg(atx_engine *e, atx_cmd *cmd);
static void do_peer_insert(atx_engine *e, atx_cmd *cmd);
static void do_dest_add(atx_engine *e, atx_cmd *cmd);

/* Run a command under the progress lock (called without the GIL). */
static int run_cmd(atx_engine *e, int type, atx_cmd *cmd) {
    cmd->rc = 0;
    cmd->err[0] = 0;
    pthread_mutex_lock(&e->prog_lock);
    if (e->dead && type != CMD_MR_DEREG) {
        pthread_mutex_unlock(&e->prog_lock);
        snprintf(cmd->err, sizeof(cmd->err), "engine is stopped");
        return -FI_ESHUTDOWN;
    }
    switch (type) {
    case CMD_MR_REG: do_mr_reg(e, cmd); break;
    case CMD_MR_DEREG: do_mr_dereg(e, cmd); break;
    case CMD_PEER_INSERT: do_peer_insert(e, cmd); break;
    case CMD_DEST_ADD: do_dest_add(e, cmd); break;
    default: cmd->rc = -FI_EINVAL; break;
    }
    pthread_mutex_unlock(&e->prog_lock);
    kick_worker(e);   /* a command may have queued an engine message */
    return cmd->rc;
}

static void cmd_finish(atx_cmd *cmd, int rc) { cmd->rc = rc; }

int atx_mr_reg(atx_engine *e, void *addr, size_t len, int remote_read, atx_mr *out, char *err,
               size_t errlen) {
    atx_cmd cmd;
    int rc;
    memset(&cmd, 0, sizeof(cmd));
    memset(out, 0, sizeof(*out));
    cmd.addr = addr;
    cmd.len = len;
    cmd.remote_read = remote_read;
    cmd.mr = out;
    rc = run_cmd(e, CMD_MR_REG, &cmd);
    if (rc && err) snprintf(err, errlen, "%s", cmd.err[0] ? cmd.err : fi_strerror(-rc));
    return rc;
}

int atx_mr_dereg(atx_engine *e, atx_mr *mr) {
    atx_cmd cmd;
    memset(&cmd, 0, sizeof(cmd));
    cmd.mr = mr;
    return run_cmd(e, CMD_MR_DEREG, &cmd);
}

int atx_peer_insert(atx_engine *e, int nnames, const void *const *names, const size_t *lens,
                    uint64_t engine_id, uint64_t *peer_out, char *err, size_t errlen) {
    atx_cmd cmd;
    int rc;
    memset(&cmd, 0, sizeof(cmd));
    cmd.engine_id = engine_id;
    cmd.nnames = nnames;
    cmd.names = names;
    cmd.lens = lens;
    rc = run_cmd(e, CMD_PEER_INSERT, &cmd);
    if (rc && err) snprintf(err, errlen, "%s", cmd.err[0] ? cmd.err : fi_strerror(-rc));
    if (!rc) *peer_out = cmd.peer;
    return rc;
}

int atx_dest_add(atx_engine *e, uint64_t peer, int n, const uint64_t *bases,
                 const uint64_t *keys, uint64_t *dest_out, char *err, size_t errlen) {
    atx_cmd cmd;
    int rc;
    memset(&cmd, 0, sizeof(cmd));
    cmd.peer = peer;
    cmd.nnames = n;
    cmd.bases = bases;
    cmd.keys = keys;
    rc = run_cmd(e, CMD_DEST_ADD, &cmd);
    if (rc && err) snprintf(err, errlen, "%s", cmd.err[0] ? cmd.err : fi_strerror(-rc));
    if (!rc) *dest_out = cmd.peer;
    return rc;
}

int atx_nic_set_weight(atx_engine *e, int nic, uint64_t weight) {
    if (nic < 0 || nic >= e->nnics) return -FI_EINVAL;
    pthread_mutex_lock(&e->prog_lock);
    e->nics[nic].weight = weight;
    pthread_mutex_unlock(&e->prog_lock);
    kick_worker(e);
    return 0;
}

/* ------------------------------------------------------------- worker */

/* 64 random bits (the kernel's; a clock mix if getrandom fails). */
static uint64_t random_u64(void) {
    uint64_t k = 0;
    if (getrandom(&k, sizeof(k), 0) != (ssize_t)sizeof(k)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        k = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ULL ^ (uint64_t)(uintptr_t)&k;
    }
    return k;
}

/* A key for a region of NIC n that a peer cannot guess: random, within
 * the provider's key size (a descriptor is a capability, docs/security.md). */
static uint64_t random_key(const atx_nic *n) {
    uint64_t k = random_u64();
    size_t ks = n->info && n->info->domain_attr->mr_key_size ? n->info->domain_attr->mr_key_size
                                                             : 8;
    if (ks < 8) k &= (1ULL << (8 * ks)) - 1;
    return k ? k : 1;
}

static void do_mr_reg(atx_engine *e, atx_cmd *cmd) {
    atx_mr *mr = cmd->mr;
    /* the least access a region needs: a source of our writes, a target of
     * the peers' writes, and remote reads only when asked for */
    uint64_t access = FI_WRITE | FI_REMOTE_WRITE;
    int i, rc = 0;
    if (cmd->remote_read) access |= FI_REMOTE_READ;
    mr->addr = cmd->addr;
    mr->len = cmd->len;
    mr->nnics = e->nnics;
    for (i = 0; i < e->nnics; i++) {
        atx_nic *n = &e->nics[i];
        struct fid_mr *fmr = NULL;
        uint64_t key = 0;
        for (int tries = 0; tries < 8; tries++) {   /* -FI_ENOKEY: that key is taken */
            key = random_key(n);
            rc = fi_mr_reg(n->domain, cmd->addr, cmd->len ? cmd->len : 1, access, 0, key, 0,
                           &fmr, NULL);
            if (rc != -FI_ENOKEY) break;
        }
        if (rc) {
            seterr(cmd->err, sizeof(cmd->err), "fi_mr_reg", rc);
            break;
        }
        if (n->pub.mr_endpoint) {
            rc = fi_mr_bind(fmr, &n->ep->fid, 0);
            if (!rc) rc = fi_mr_enable(fmr);
            if (rc) {
                seterr(cmd->err, sizeof(cmd->err), "fi_mr_bind/enable", rc);
                fi_close(&fmr->fid);
                break;
            }
        }
        mr->fid[i] = fmr;
        mr->desc[i] = fi_mr_desc(fmr);
        mr->key[i] = n->pub.prov_key ? fi_mr_key(fmr) : key;
        mr->base[i] = n->pub.virt_addr ? (uint64_t)(uintptr_t)cmd->addr : 0;
    }
    if (!rc) {
        atx_reg *reg = calloc(1, sizeof(*reg));
        if (reg) {
            reg->nnics = mr->nnics;
            for (int j = 0; j < mr->nnics; j++) reg->fid[j] = mr->fid[j];
            reg->next = e->regs;
            if (e->regs) e->regs->prev = reg;
            e->regs = reg;
            mr->reg = reg;
            /* (a full table: peers never take the copy lane into this region) */
            for (int j = 0; e->keytab && j < mr->nnics; j++)
                atx_keytab_add(e->keytab, mr->key[j], mr->base[j], mr->len);
        } else {
            seterr(cmd->err, sizeof(cmd->err), "registration record", -FI_ENOMEM);
            rc = -FI_ENOMEM;
        }
    }
    if (rc) {
        for (int j = 0; j < i; j++) fi_close(&((struct fid_mr *)mr->fid[j])->fid);
        memset(mr->fid, 0, sizeof(mr->fid));
    }
    cmd_finish(cmd, rc);
}

/* Close a registration record's MRs (those still open); 0 or the first error. */
static int reg_close_mrs(atx_reg *reg) {
    int rc = 0;
    for (int i = 0; i < reg->nnics; i++) {
        if (reg->fid[i]) {
            int r = fi_close(&reg->fid[i]->fid);
            if (r && !rc) rc = r;
            reg->fid[i] = NULL;
        }
    }
    return rc;
}

static void reg_unlink(atx_engine *e, atx_reg *reg) {
    if (reg->prev) reg->prev->next = reg->next;
    else e->regs = reg->next;
    if (reg->next) reg->next->prev = reg->prev;
    free(reg);
}

static void do_mr_dereg(atx_engine *e, atx_cmd *cmd) {
    atx_mr *mr = cmd->mr;
    int rc = 0;
    /* an operation reported early (stalled peer) may still have work
     * requests at the NIC reading this region: it stays registered */
    if (!e->dead) {
        for (atx_op *op = e->live; op; op = op->lnext) {
            if (op->inflight && op->src == (char *)mr->addr) {
                snprintf(cmd->err, sizeof(cmd->err),
                         "work requests of a failed operation are still at the NIC");
                cmd_finish(cmd, -FI_EBUSY);
                return;
            }
        }
        for (int i = 0; i < e->nnics; i++) {
            for (size_t j = 0; j < e->nics[i].tx_depth; j++) {
                atx_ctx *c = &e->nics[i].tx_ctx[j];
                if (c->used && c->abandoned && c->src == (char *)mr->addr) {
                    snprintf(cmd->err, sizeof(cmd->err),
                             "work requests of a lane that went down are still at the NIC");
                    cmd_finish(cmd, -FI_EBUSY);
                    return;
                }
            }
        }
    }
    /* no peer copies into it once its keys are withdrawn (shm_keys.c) */
    for (int i = 0; e->keytab && i < mr->nnics; i++) atx_keytab_remove(e->keytab, mr->key[i]);
    /* (closed already if shutdown_worker closed the regions first) */
    if (mr->reg) {
        rc = reg_close_mrs(mr->reg);
        reg_unlink(e, mr->reg);
        mr->reg = NULL;
    }
    memset(mr->fid, 0, sizeof(mr->fid));
    cmd_finish(cmd, rc);
}

/* Add a peer (one raw endpoint name per NIC of the peer), pairing NICs as
 * lanes, and say hello (MSG_HELLO) so that it gives us a token slot.
 * Called under prog_lock. */
static int insert_peer(atx_engine *e, int nnames, const void *const *names, const size_t *lens,
                       uint64_t engine_id, uint64_t *peer_out, char *err, size_t errlen) {
    int L = e->nnics, R = nnames, lanes;
    atx_peer *p;
    if (R < 1 || R > ATX_MAX_NICS) {
        if (err) snprintf(err, errlen, "peer lists %d NICs (1..%d allowed)", R, ATX_MAX_NICS);
        return -FI_EINVAL;
    }
    if (e->npeers == e->peers_cap) {
        size_t cap = e->peers_cap ? e->peers_cap * 2 : 16;
        atx_peer *np = realloc(e->peers, cap * sizeof(*np));
        if (!np) return -FI_ENOMEM;
        e->peers = np;
        e->peers_cap = cap;
    }
    p = &e->peers[e->npeers];
    memset(p, 0, sizeof(*p));
    p->nremote = R;
    p->engine_id = engine_id;
    p->slot = SLOT_NONE;
    for (int r = 0; r < R; r++) {
        void *copy = malloc(lens[r]);
        if (!copy) {
            for (int j = 0; j < r; j++) free((void *)p->names[j]);
            return -FI_ENOMEM;
        }
        memcpy(copy, names[r], lens[r]);
        p->names[r] = copy;
    }
    lanes = L > R ? L : R;
    for (int k = 0; k < lanes; k++) {
        int l = k % L, r = k % R;
        fi_addr_t fa = FI_ADDR_NOTAVAIL;
        int rc = fi_av_insert(e->nics[l].av, names[r], 1, &fa, 0, NULL);
        if (rc != 1) {
            if (err)
                snprintf(err, errlen, "fi_av_insert (our NIC %d, peer NIC %d): %s (%d)", l, r,
                         fi_strerror(rc < 0 ? -rc : FI_EINVAL), rc);
            for (int j = 0; j < R; j++) free((void *)p->names[j]);
            return rc < 0 ? rc : -FI_EINVAL;   /* AV entries already made stay unused */
        }
        p->fa[l][r] = fa;
        p->route[l][p->nroute[l]++] = (uint8_t)r;
    }
    *peer_out = e->npeers++;
    /* Failover needs tokens (several NICs, 8 bytes of CQ data): say hello;
     * immediates to this peer wait for its answer (one round trip, once).
     * Engine id 0: a bare core user, no hello. */
    if (e->ndoms > 1 && e->nics[0].imm_flag && e->cfg.engine_id && e->hello_len &&
        post_internal_send(e, *peer_out, MSG_HELLO, e->hello + 1, e->hello_len - 1) == 0) {
        p = &e->peers[*peer_out];
        p->slot = SLOT_WAIT;
        p->hello_at = now_ns();
    }
    return 0;
}

static void do_peer_insert(atx_engine *e, atx_cmd *cmd) {
    cmd_finish(cmd, insert_peer(e, cmd->nnames, cmd->names, cmd->lens, cmd->engine_id,
                                &cmd->peer, cmd->err, sizeof(cmd->err)));
}

static void do_dest_add(atx_engine *e, atx_cmd *cmd) {
    atx_dest *d;
    if (cmd->peer >= e->npeers) {
        snprintf(cmd->err, sizeof(cmd->err), "no peer %llu", (unsigned long long)cmd->peer);
        cmd_finish(cmd, -FI_EINVAL);
        return;
    }
    if (cmd->nnames != e->peers[cmd->peer].nremote) {
        snprintf(cmd->err, sizeof(cmd->err), "region lists %d NICs, its owner's address %d",
                 cmd->nnames, e->peers[cmd->peer].nremote);
        cmd_finish(cmd, -FI_EINVAL);
        return;
    }
    if (e->ndests == e->dests_cap) {
        size_t cap = e->dests_cap ? e->dests_cap * 2 : 64;
        atx_dest *nd = realloc(e->dests, cap * sizeof(*nd));
        if (!nd) {
            cmd_finish(cmd, -FI_ENOMEM);
            return;
        }
        e->dests = nd;
        e->dests_cap = cap;
    }
    d = &e->dests[e->ndests];
    memset(d, 0, sizeof(*d));
    d->peer = cmd->peer;
    memcpy(d->base, cmd->bases, (size_t)cmd->nnames * sizeof(uint64_t));
    memcpy(d->key, cmd->keys, (size_t)cmd->nnames * sizeof(uint64_t));
    cmd->peer = e->ndests++;
    cmd_finish(cmd, 0);
}

static void live_add(atx_engine *e, atx_op *op) {
    op->lprev = NULL;
    op->lnext = e->live;
    if (e->live) e->live->lprev = op;
    e->live = op;
}

static void live_del(atx_engine *e, atx_op *op) {
    if (op->lprev) op->lprev->lnext = op->lnext; else e->live = op->lnext;
    if (op->lnext) op->lnext->lprev = op->lprev;
}

static void postq_add(atx_engine *e, atx_op *op) {
    op->next = NULL;
    op->in_post_q = 1;
    if (e->post_tail) e->post_tail->next = op; else e->post_head = op;
    e->post_tail = op;
}

/* Its record: the operation's outcome goes to the loop. */
static void op_report(atx_engine *e, atx_op *op) {
    atx_record r;
    if (op->reported) return;
    op->reported = 1;
    if (op->internal) {
        free(op->errtext);
        op->errtext = NULL;
        return;
    }
    memset(&r, 0, sizeof(r));
    r.id = op->id;
    r.kind = ATX_REC_OP;
    r.status = op->status;
    r.prov_errno = op->prov_errno;
    r.bytes = op->bytes;
    r.data = op->errtext;
    op->errtext = NULL;
    batch_push(e, &r);
}

static void op_complete(atx_engine *e, atx_op *op) {
    op_report(e, op);
    if (op->msg_mr) fi_close(&op->msg_mr->fid);
    live_del(e, op);
    op_free(op);
}

static void op_fail(atx_op *op, int status, int prov_errno, const char *text) {
    if (op->status) return;
    op->status = status;
    op->prov_errno = prov_errno;
    if (text) op->errtext = strdup(text);
}

/* Is the op finished?  Called after any change of its state. */
static void op_check(atx_engine *e, atx_op *op) {
    if (op->in_post_q || op->inflight) return;
    if (op->status == 0 && op->nretry) {
        postq_add(e, op);
        return;
    }
    if (op->status == 0 && op->tail_imm == 1 && op->next_wr == op->nwr) {
        op->tail_imm = 2;
        postq_add(e, op);
        return;
    }
    op_complete(e, op);
}

static atx_ctx *ctx_get(atx_nic *n) {
    atx_ctx *c = n->tx_free;
    if (c) {
        n->tx_free = c->next_free;
        n->tx_used++;
        c->used = 1;
        c->abandoned = c->probe = 0;
        c->src = NULL;
    }
    return c;
}

static void ctx_put(atx_nic *n, atx_ctx *c) {
    c->used = 0;
    c->next_free = n->tx_free;
    n->tx_free = c;
    n->tx_used--;
}

/* Describe work request i of op: local buffer, length, destination id,
 * offset in the destination region and whether it carries the immediate. */
static void op_wr(const atx_op *op, uint64_t i, void **lbuf, size_t *len, uint64_t *dest,
                  uint64_t *roff, int *imm) {
    switch (op->type) {
    case OP_WRITE: {
        uint64_t off = i * op->chunk;
        uint64_t l = op->len - off;
        if (l > op->chunk) l = op->chunk;
        *lbuf = op->src ? op->src + op->src_off + off : NULL;
        *len = l;
        *dest = op->dest;
        *roff = op->dst_off + off;
        *imm = op->has_imm && op->nwr == 1;
        break;
    }
    case OP_PAGED:
        *lbuf = op->src + op->src_off + (uint64_t)op->src_pages[i] * op->src_stride;
        *len = op->page_size;
        *dest = op->dest;
        *roff = op->dst_off + (uint64_t)op->dst_pages[i] * op->dst_stride;
        *imm = op->has_imm;
        break;
    case OP_SCATTER: {
        const atx_scatter_entry *s = &op->entries[i];
        *lbuf = op->src ? op->src + s->src_off : NULL;
        *len = s->len;
        *dest = s->dest;
        *roff = s->dst_off;
        *imm = op->has_imm;
        break;
    }
    default:
        *lbuf = NULL;
        *len = 0;
        *dest = UINT64_MAX;
        *roff = 0;
        *imm = 0;
        break;
    }
}

/* The NIC selector: which NIC takes a work request of len bytes to peer p
 * now?  The one with the least work in flight (bytes, plus ATX_WR_COST per
 * request) per unit of weight, among NICs with a free context, not pushed
 * back, within nic_budget bytes in flight (several distinct NICs only:
 * endpoints of one NIC drain from one link) and whose lane to p is up; ties
 * go round-robin.  -1: no NIC has room; -2: only NICs whose lane to p is
 * down have room. */
static int nic_has_room(const atx_nic *n) {
    return n->tx_free && !n->tx_blocked;
}

/* Is our NIC i's lane to peer p up (and not pushed back since the last poll)? */
static int lane_open(const atx_nic *n, const atx_peer *p, int i) {
    return !p->down[i] && p->eagain_at[i] != n->stats.polls + 1;
}

/* prefer: a NIC to take whenever it can (-1: none) */
static int choose_nic(atx_engine *e, uint64_t len, const atx_peer *p, int prefer) {
    int best = -1;
    unsigned __int128 best_cost = 0;
    uint64_t best_w = 1;
    int lane_down = 0;
    if (e->nnics == 1) {
        atx_nic *n = &e->nics[0];
        if (!nic_has_room(n)) return -1;
        return lane_open(n, p, 0) ? 0 : -2;
    }
    if (prefer >= 0 && nic_has_room(&e->nics[prefer]) && e->nics[prefer].weight &&
        lane_open(&e->nics[prefer], p, prefer))
        return prefer;
    for (int k = 0; k < e->nnics; k++) {
        int i = (int)((e->rr_nic + (unsigned)k) % (unsigned)e->nnics);
        atx_nic *n = &e->nics[i];
        uint64_t load;
        if (!nic_has_room(n) || !n->weight) continue;
        if (e->ndoms > 1 && n->inflight_bytes && n->inflight_bytes + len > e->cfg.nic_budget)
            continue;
        if (!lane_open(n, p, i)) {
            lane_down = 1;   /* (or pushed back since the last poll) */
            continue;
        }
        load = n->inflight_bytes + len + (uint64_t)ATX_WR_COST * (n->tx_used + 1);
        /* load / weight < best_cost / best_w, without division */
        if (best < 0 || (unsigned __int128)load * best_w < best_cost * n->weight) {
            best = i;
            best_cost = load;
            best_w = n->weight;
        }
    }
    if (best >= 0) e->rr_nic = (unsigned)best + 1;
    return best >= 0 ? best : lane_down ? -2 : -1;
}

/* Our NIC `nic` reaching destination `dest`: the peer's NIC (rotating over
 * the lanes of `nic`), its address, and the region's base and key there. */
static void route_wr(atx_engine *e, uint64_t dest, int nic, fi_addr_t *fa, uint64_t *base,
                     uint64_t *key) {
    const atx_dest *d = &e->dests[dest];
    atx_peer *p = &e->peers[d->peer];
    int r = p->route[nic][p->nroute[nic] == 1 ? 0 : p->rr[nic]++ % (uint32_t)p->nroute[nic]];
    *fa = p->fa[nic][r];
    *base = d->base[r];
    *key = d->key[r];
}

/* May a copy-lane write go into [addr, addr + len) of the peer's region
 * `key`?  Maps the peer's key table the first time.  1: yes, and the table
 * is locked until atx_keytab_release. */
static int copy_admitted(atx_peer *p, uint64_t key, uint64_t addr, uint64_t len) {
    if (p->keytab_state == 0) {
        p->keytab = p->engine_id ? atx_keytab_open(p->engine_id) : NULL;
        p->keytab_state = p->keytab ? 1 : -1;
    }
    return p->keytab_state > 0 && atx_keytab_admit(p->keytab, key, addr, len);
}

/* Post one work request of op: a WR to post again (its lane went down),
 * else the tail immediate, else the next WR.  Returns 0, 1 (no NIC can take
 * it now: queue depth, budget, back-pressure or every lane to the peer
 * down) or an error (-FI_EAGAIN: NIC *nic_out pushed back). */
static int post_one(atx_engine *e, atx_op *op, int *nic_out, uint64_t *peer_out) {
    atx_nic *n;
    atx_ctx *c;
    atx_peer *p;
    int rc, nic, with_imm, is_retry = op->nretry > 0, copy = 0;
    uint64_t wr, dest = UINT64_MAX, roff = 0, base = 0, key = 0, peer;
    uint64_t data = 0, flags = FI_COMPLETION;
    fi_addr_t fa;
    size_t len;
    void *lbuf, *desc;

    if (is_retry) wr = op->retry[op->nretry - 1].wr;
    else if (op->tail_imm == 2) wr = ATX_WR_TAIL;
    else wr = op->next_wr;

    if (op->type == OP_SEND) {
        lbuf = op->msg;
        len = op->msglen;
        peer = op->peer;
        with_imm = 0;
    } else {
        if (wr == ATX_WR_TAIL) {
            /* the immediate of a multi-chunk write, after all chunks landed */
            lbuf = NULL;
            len = 0;
            dest = op->dest;
            roff = op->dst_off;
            with_imm = 1;
        } else {
            op_wr(op, wr, &lbuf, &len, &dest, &roff, &with_imm);
        }
        if (dest >= e->ndests) return -FI_EINVAL;
        peer = e->dests[dest].peer;
    }
    if (peer >= e->npeers) return -FI_EINVAL;
    p = &e->peers[peer];
    *peer_out = peer;
    *nic_out = -2;
    if (p->skip_pass == e->pass) return 1;   /* its peer held this pass up */
    if (with_imm && !is_retry && p->slot == SLOT_WAIT)
        return 1;   /* its token slot is on the way (MSG_HELLO_ACK) */
    /* the immediate of a copy-lane write prefers the same lane, whose region
     * the target holds only briefly (the other is locked while it copies) */
    nic = choose_nic(e, len, p, wr == ATX_WR_TAIL ? op->copy_nic - 1 : -1);
    *nic_out = nic;
    if (nic < 0) return 1;   /* -1: no NIC has room; -2: none with a lane up to p */
    n = &e->nics[nic];
    if (op->type == OP_SEND) {
        fa = p->fa[nic][p->route[nic][0]];
        desc = NULL;
        if (n->pub.mr_local && !op->msg_mr) {
            rc = fi_mr_reg(n->domain, op->msg, op->msglen ? op->msglen : 1, FI_SEND, 0,
                           random_key(n), 0, &op->msg_mr, NULL);
            if (rc) return rc;
        }
        if (op->msg_mr) desc = fi_mr_desc(op->msg_mr);
        c = ctx_get(n);
        call_enter(e);
        rc = (int)fi_send(n->ep, op->msg, op->msglen, desc, fa, c);
        call_exit(e);
    } else {
        struct fi_msg_rma msg;
        struct iovec iov;
        struct fi_rma_iov riov;
        route_wr(e, dest, nic, &fa, &base, &key);
        /* The shm copy lane.  libfabric 1.17's shm copies a write in the
         * initiator's own fi_writemsg (process_vm_writev, "fast RMA") when
         * it carries neither remote CQ data nor FI_DELIVERY_COMPLETE;
         * otherwise the target copies it while it progresses.  Writes on
         * this lane go that way, so while the target copies what came over
         * the other endpoint, this process copies the rest: two cores copy.
         * Past the inject size a shm write completes only once its bytes
         * are placed (the target has copied, or this call has), so no
         * FI_DELIVERY_COMPLETE is needed.  A write's immediate moves to a
         * tail immediate, posted once the data completed (op_check); the
         * chunks of a multi-chunk write already have one.  Not for page
         * lists or scatters (one immediate per WR), retries or writes past
         * ATX_COPY_MAX (the copy holds the target's region lock).  Nor for
         * writes under copy_min (64 KiB): there the copy on the posting
         * thread costs more than the second core gains (session 9,
         * docs/benchmarks.md, 12 rounds each, pipeline style: 16 KiB 0.76
         * of raw C with the lane against 0.92 without, 32 KiB 0.85 against
         * 0.92; 64 KiB 1.06-1.09 against 0.91-0.92). */
        copy = n->pub.copy_lane && op->type == OP_WRITE && wr != ATX_WR_TAIL && !is_retry &&
               len > n->pub.inject_size && len >= e->copy_min && len <= ATX_COPY_MAX;
        /* ...and only while the target's key table admits it: shm checks no
         * key on that path (shm_keys.c).  Admitted, the table stays locked
         * until the post returned. */
        if (copy && !copy_admitted(p, key, base + roff, len)) {
            copy = 0;
            n->stats.copies_refused++;
        }
        if (copy) {
            /* no CQ data, no delivery-complete: the provider's copying path */
        } else if (with_imm) {
            flags |= FI_REMOTE_CQ_DATA;
            if (is_retry) {
                data = op->retry[op->nretry - 1].data;   /* the same token again */
            } else {
                data = n->imm_flag | op->imm;
                if (n->imm_flag && p->slot >= 0)
                    data |= ATX_TOK_VALID | ((uint64_t)p->slot << ATX_TOK_SLOT_SHIFT) |
                            ((uint64_t)p->seq++ << ATX_TOK_SEQ_SHIFT);
            }
        } else if (n->imm_flag && n->pub.data_progress_manual) {
            /* an "activity" completion without the immediate flag: a
             * manual-progress target sees work and keeps polling while the
             * bytes stream in (the receiver does not count it) */
            flags |= FI_REMOTE_CQ_DATA;
            data = 0;
        }
        /* Zero-byte writes place nothing; shm 1.17 never completes them
         * under FI_DELIVERY_COMPLETE, so they use the default completion.
         * The chunks of a write whose immediate follows them (tail_imm) are
         * always delivery-complete: over several NICs (connections) nothing
         * else orders the immediate after them. */
        if (len && !copy && (n->pub.delivery_complete || op->tail_imm))
            flags |= FI_DELIVERY_COMPLETE;
        c = ctx_get(n);
        desc = op->src_desc[nic];
        iov.iov_base = lbuf;
        iov.iov_len = len;
        riov.addr = base + roff;
        riov.len = len;
        riov.key = key;
        memset(&msg, 0, sizeof(msg));
        msg.msg_iov = &iov;
        msg.desc = &desc;
        msg.iov_count = 1;
        msg.addr = fa;
        msg.rma_iov = &riov;
        msg.rma_iov_count = 1;
        msg.context = c;
        msg.data = data;
        /* (a shm post spins on the peer's region lock: see shm_unstick.c) */
        call_enter(e);
        rc = (int)fi_writemsg(n->ep, &msg, flags);
        call_exit(e);
        if (copy) atx_keytab_release(p->keytab);
    }
    if (rc) {
        ctx_put(n, c);
        return rc;
    }
    if (copy) {
        n->stats.wrs_copied++;
        op->copy_nic = nic + 1;
        if (with_imm) op->tail_imm = 1;   /* its immediate follows the data */
    }
    c->op = op;
    c->peer = peer;
    c->wr = wr;
    c->data = data;
    c->src = op->src;
    c->bytes = len;
    n->inflight_bytes += len;
    n->stats.wrs_posted++;
    if (!p->lane_inflight[nic]) p->lane_since[nic] = e->now;
    p->lane_inflight[nic]++;
    if (!is_retry && op->next_wr == 0 && wr != ATX_WR_TAIL) {
        op->nic = nic;
        n->stats.ops_posted++;
    }
    op->inflight++;
    if (is_retry) op->nretry--;
    else if (wr == ATX_WR_TAIL) op->tail_imm = 3;
    else op->next_wr++;
    return 0;
}

/* Post queued work, in order, as far as the NICs take it.  An operation
 * that cannot go on for reasons of its peer (every lane to it down, its
 * token slot on the way, the provider pushing back on its connection) is
 * passed over for this pass, so one dead or slow peer does not hold up the
 * others; a pass ends when no NIC has room at all.  Returns the number of
 * WRs posted. */
static size_t post_pending(atx_engine *e) {
    size_t posted = 0;
    int eagain[ATX_MAX_NICS] = {0};
    atx_op *prev = NULL, *op = e->post_head;
    e->pass++;
    while (op) {
        atx_op *next = op->next;
        int more = op->status == 0 &&
                   (op->nretry || op->next_wr < op->nwr || op->tail_imm == 2);
        if (more && !op->nretry && op->tail_imm == 1 && op->next_wr == op->nwr) more = 0;
        if (more) {
            int nic = -1;
            uint64_t peer = UINT64_MAX;
            int rc = post_one(e, op, &nic, &peer);
            if (rc == 0) {
                posted++;
                continue;           /* the same op: its next WR */
            }
            if (rc == 1 && nic == -1) break;   /* no NIC has room: later */
            if (rc == 1 || rc == -FI_EAGAIN) {
                if (rc == -FI_EAGAIN) {
                    atx_nic *n = &e->nics[nic];
                    n->stats.eagain++;
                    /* no retry to this peer on this NIC before the NIC is
                     * polled (the provider wants progress first); pushed back
                     * for several peers: the NIC itself is full */
                    if (peer < e->npeers) e->peers[peer].eagain_at[nic] = n->stats.polls + 1;
                    if (++eagain[nic] >= 4) n->tx_blocked = 1;
                }
                if (peer < e->npeers) e->peers[peer].skip_pass = e->pass;
                prev = op;
                op = next;
                continue;
            }
            {
                char text[ATX_ERRLEN];
                snprintf(text, sizeof(text), "posting %s failed: %s",
                         op->type == OP_SEND ? "fi_send" : "fi_writemsg", fi_strerror(-rc));
                op_fail(op, rc, 0, text);
                e->nics[nic >= 0 ? nic : 0].stats.errors++;
            }
        }
        /* nothing more to post for this op now: out of the queue */
        if (prev) prev->next = next; else e->post_head = next;
        if (e->post_tail == op) e->post_tail = prev;
        op->in_post_q = 0;
        op_check(e, op);   /* may queue it again, at the tail */
        if (!next && e->post_tail == op) {
            /* it came back at the tail: visit it once more */
            next = op;
        }
        op = next;
    }
    return posted;
}

static void accept_op(atx_engine *e, atx_op *op) {
    live_add(e, op);
    if (op->nwr == 0) {
        e->nics[0].stats.ops_posted++;
        op_complete(e, op);
        return;
    }
    postq_add(e, op);
}

static int post_rx(atx_engine *e, atx_nic *n, atx_ctx *c) {
    int rc;
    for (int tries = 0; tries < 1000; tries++) {
        rc = (int)fi_recv(n->ep, c->buf, e->rx_size, n->rx_desc, FI_ADDR_UNSPEC, c);
        if (rc != -FI_EAGAIN) return rc;
        fi_cq_read(n->cq, NULL, 0);
    }
    return rc;
}

static void handle_tx_done(atx_engine *e, atx_nic *n, atx_ctx *c, int status, int prov_errno,
                           const char *text) {
    atx_op *op = c->op;
    uint64_t bytes = c->bytes;
    int nic = (int)(n - e->nics);
    atx_peer *p = c->peer < e->npeers ? &e->peers[c->peer] : NULL;
    ctx_put(n, c);   /* c's fields stay readable until the next ctx_get */
    n->inflight_bytes -= bytes;
    n->stats.wrs_completed++;
    if (p) {
        if (!c->abandoned && !c->probe && p->lane_inflight[nic]) p->lane_inflight[nic]--;
        if (!status) {
            p->lane_since[nic] = e->now;
            p->last_ok = e->now;
        }
    }
    if (c->probe) {
        /* a lane probe came back: the lane works again (or is still broken) */
        if (p) {
            p->probing[nic] = 0;
            if (!status) p->down[nic] = 0;
            else p->down_at[nic] = e->now;
        }
        return;
    }
    if (c->abandoned) {
        /* its lane was declared down and the WR posted again elsewhere */
        if (status) n->stats.errors++;
        return;
    }
    op->inflight--;
    if (status) {
        op_fail(op, status, prov_errno, text);
        n->stats.errors++;
    } else {
        op->bytes += bytes;
        n->stats.bytes_written += bytes;
    }
    op_check(e, op);
}

/* The slot of sender engine_id (created if new and there is room), or -1. */
static int slot_of(atx_engine *e, uint64_t engine_id) {
    for (size_t i = 0; i < e->nslots; i++)
        if (e->slots[i].engine_id == engine_id) return (int)i;
    if (e->nslots >= ATX_MAX_SLOTS) return -1;
    if (!(e->nslots & (e->nslots - 1)) || e->nslots == 0) {
        size_t cap = e->nslots ? e->nslots * 2 : 4;
        atx_slot *ns = realloc(e->slots, cap * sizeof(*ns));
        if (!ns) return -1;
        e->slots = ns;
    }
    memset(&e->slots[e->nslots], 0, sizeof(atx_slot));
    e->slots[e->nslots].engine_id = engine_id;
    return (int)e->nslots++;
}

/* Has the immediate with this token been counted already?  Marks it seen.
 * Sequence numbers older than the window count as seen: a sender has far
 * fewer immediates in flight to us than ATX_DEDUP_WIN, so only a stale copy
 * (a work request of a lane that went down, arriving after it healed) is
 * that old. */
static int token_seen(atx_engine *e, uint64_t data) {
    uint64_t slot = (data >> ATX_TOK_SLOT_SHIFT) & ATX_TOK_SLOT_MASK;
    uint16_t seq = (uint16_t)(data >> ATX_TOK_SEQ_SHIFT);
    atx_slot *s;
    int16_t d;
    uint32_t bit;
    if (slot >= e->nslots) return 0;   /* not a slot we gave: cannot tell */
    s = &e->slots[slot];
    if (!s->seen_any) {
        s->seen_any = 1;
        s->hi = (uint16_t)(seq - 1);
    }
    d = (int16_t)(uint16_t)(seq - s->hi);
    if (d > 0) {
        /* the window slides: forget what it leaves (hi+1 .. seq are new) */
        if ((uint32_t)d >= ATX_DEDUP_WIN) {
            memset(s->bits, 0, sizeof(s->bits));
        } else {
            for (uint16_t k = (uint16_t)(s->hi + 1);; k++) {
                bit = (uint32_t)k % ATX_DEDUP_WIN;
                s->bits[bit / 8] &= (uint8_t)~(1u << (bit % 8));
                if (k == seq) break;
            }
        }
        s->hi = seq;
    } else if ((uint32_t)(-(int32_t)d) >= ATX_DEDUP_WIN) {
        return 1;
    }
    bit = (uint32_t)seq % ATX_DEDUP_WIN;
    if (s->bits[bit / 8] & (1u << (bit % 8))) return 1;
    s->bits[bit / 8] |= (uint8_t)(1u << (bit % 8));
    return 0;
}

static int post_internal_send(atx_engine *e, uint64_t peer, int kind, const void *payload,
                              size_t len);
static int insert_peer(atx_engine *e, int nnames, const void *const *names, const size_t *lens,
                       uint64_t engine_id, uint64_t *peer_out, char *err, size_t errlen);

/* MSG_HELLO from a sender: give it a slot and tell it (MSG_HELLO_ACK). */
static void on_hello(atx_engine *e, atx_nic *n, const char *b, size_t len) {
    uint64_t id, peer = UINT64_MAX;
    const void *names[ATX_MAX_NICS];
    size_t lens[ATX_MAX_NICS], pos = 9;
    int nn, slot;
    char ack[1 + 8 + 2];
    if (len < 10) goto bad;
    memcpy(&id, b + 1, 8);
    nn = (unsigned char)b[pos++];
    if (nn < 1 || nn > ATX_MAX_NICS) goto bad;
    for (int i = 0; i < nn; i++) {
        uint16_t l;
        if (len - pos < 2) goto bad;
        memcpy(&l, b + pos, 2);
        pos += 2;
        if (l == 0 || l > 256 || len - pos < l) goto bad;
        names[i] = b + pos;
        lens[i] = l;
        pos += l;
    }
    slot = slot_of(e, id);   /* -1: no room, that sender's immediates go without tokens */
    for (size_t i = 0; i < e->npeers; i++)
        if (e->peers[i].engine_id == id) peer = i;
    /* a hello costs us a peer entry only with a slot: at most ATX_MAX_SLOTS
     * (unauthenticated: anyone who can reach us can say hello) */
    if (peer == UINT64_MAX &&
        (slot < 0 || insert_peer(e, nn, names, lens, id, &peer, NULL, 0) != 0))
        return;
    memcpy(ack + 1, &e->cfg.engine_id, 8);
    {
        uint16_t s16 = slot < 0 ? ATX_NO_SLOT : (uint16_t)slot;
        memcpy(ack + 9, &s16, 2);
    }
    post_internal_send(e, peer, MSG_HELLO_ACK, ack + 1, sizeof(ack) - 1);
    return;
bad:
    n->stats.msgs_bad++;
}

/* MSG_HELLO_ACK: our slot at that peer; our immediates to it carry tokens. */
static void on_hello_ack(atx_engine *e, atx_nic *n, const char *b, size_t len) {
    uint64_t id;
    uint16_t slot;
    if (len != 11) {
        n->stats.msgs_bad++;
        return;
    }
    memcpy(&id, b + 1, 8);
    memcpy(&slot, b + 9, 2);
    for (size_t i = 0; i < e->npeers; i++)
        if (e->peers[i].engine_id == id && e->peers[i].slot == SLOT_WAIT)
            e->peers[i].slot = slot <= ATX_TOK_SLOT_MASK ? slot : SLOT_NONE;
}

static void handle_rx(atx_engine *e, atx_nic *n, struct fi_cq_data_entry *ce) {
    atx_ctx *c = ce->op_context;
    if (ce->flags & FI_REMOTE_WRITE) {
        if ((ce->flags & FI_REMOTE_CQ_DATA) &&
            (!n->imm_flag || (ce->data & n->imm_flag))) {
            if ((ce->data & ATX_TOK_VALID) && n->imm_flag && token_seen(e, ce->data)) {
                n->stats.imms_duplicate++;
            } else {
                n->stats.imms_received++;
                imm_arrived(e, n, (uint32_t)ce->data);
            }
        }
        /* FI_RX_CQ_DATA: the write consumed one of our receive buffers */
        if (n->pub.rx_cq_data && c && c->kind == CTX_RX) post_rx(e, n, c);
        return;
    }
    if (c && c->kind == CTX_RX) {
        const char *b = c->buf;
        size_t len = ce->len;
        int kind = len ? (unsigned char)b[0] : -1;
        if (kind == MSG_USER && len - 1 > e->cfg.msg_size) {
            n->stats.msgs_bad++;   /* larger than we accept (the buffer has room for a hello) */
        } else if (kind == MSG_USER) {
            atx_record r;
            memset(&r, 0, sizeof(r));
            r.kind = ATX_REC_MSG;
            r.bytes = len - 1;
            r.data = malloc(len);
            if (r.data) {
                memcpy(r.data, b + 1, len - 1);
                batch_push(e, &r);
            }
            n->stats.msgs_received++;
        } else if (kind == MSG_HELLO) {
            on_hello(e, n, b, len);
        } else if (kind == MSG_HELLO_ACK) {
            on_hello_ack(e, n, b, len);
        } else if (kind != MSG_PROBE) {
            n->stats.msgs_bad++;
        }
        post_rx(e, n, c);
    }
}

/* Read completions of NIC n; returns the number handled. */
static size_t poll_cq(atx_engine *e, atx_nic *n, int rounds) {
    struct fi_cq_data_entry ents[ATX_CQ_BATCH];
    size_t total = 0;
    n->tx_blocked = 0;   /* this poll progressed the provider: posting may go on */
    for (int round = 0; round < rounds; round++) {
        ssize_t got;
        call_enter(e);   /* (a shm CQ read spins on our own region's lock) */
        got = fi_cq_read(n->cq, ents, ATX_CQ_BATCH);
        call_exit(e);
        n->stats.polls++;
        if (got == -FI_EAGAIN) break;
        if (got == -FI_EAVAIL) {
            struct fi_cq_err_entry err;
            char text[ATX_ERRLEN];
            atx_ctx *c;
            memset(&err, 0, sizeof(err));
            if (fi_cq_readerr(n->cq, &err, 0) != 1) break;
            total++;
            c = err.op_context;
            snprintf(text, sizeof(text), "%s (provider: %s)", fi_strerror(err.err),
                     fi_cq_strerror(n->cq, err.prov_errno, err.err_data, NULL, 0));
            if (c && c->kind == CTX_TX) {
                handle_tx_done(e, n, c, -(int)err.err, err.prov_errno, text);
            } else if (c && c->kind == CTX_RX) {
                n->stats.errors++;
                if (!e->stop) post_rx(e, n, c);
            } else {
                n->stats.errors++;
            }
            continue;
        }
        if (got < 0) {
            n->stats.errors++;
            break;
        }
        for (ssize_t i = 0; i < got; i++) {
            struct fi_cq_data_entry *ce = &ents[i];
            atx_ctx *c = ce->op_context;
            if (ce->flags & (FI_REMOTE_WRITE | FI_RECV)) {
                handle_rx(e, n, ce);
            } else if (c && c->kind == CTX_TX) {
                handle_tx_done(e, n, c, 0, 0, NULL);
            }
        }
        total += (size_t)got;
        if (got < ATX_CQ_BATCH) break;
    }
    return total;
}

/* The latest progress of op's peer(s): the oldest last_ok among them. */
static uint64_t op_peer_ok(const atx_engine *e, const atx_op *op) {
    uint64_t ok = UINT64_MAX;
    switch (op->type) {
    case OP_WRITE:
    case OP_PAGED:
        return e->peers[e->dests[op->dest].peer].last_ok;
    case OP_SEND:
        return e->peers[op->peer].last_ok;
    case OP_SCATTER:
        for (uint64_t i = 0; i < op->nwr; i++) {
            uint64_t t = e->peers[e->dests[op->entries[i].dest].peer].last_ok;
            if (t < ok) ok = t;
        }
        return ok == UINT64_MAX ? 0 : ok;
    default:
        return 0;
    }
}

/* Fail the operations whose peer made no progress for peer_timeout since
 * they were submitted: a dead or unreachable peer.  Their records go out
 * now; work requests still at the NIC keep the op (and the source region,
 * see do_mr_dereg) until they come back or the endpoint closes. */
static void scan_stalls(atx_engine *e, uint64_t t) {
    e->last_scan = t;
    for (atx_op *op = e->live; op; op = op->lnext) {
        uint64_t ref;
        if (op->reported) continue;
        ref = op_peer_ok(e, op);
        if (ref < op->t_start) ref = op->t_start;
        if (t > ref && t - ref > e->cfg.peer_timeout_ns) {
            char text[ATX_ERRLEN];
            snprintf(text, sizeof(text),
                     "no completion from the peer for %.1f s: it is dead or unreachable",
                     (double)e->cfg.peer_timeout_ns / 1e9);
            op_fail(op, -FI_ETIMEDOUT, 0, text);
            op_report(e, op);
        }
    }
}

static void lane_reconnect(atx_engine *e, atx_peer *p, int l);

/* Lane (peer p, our NIC l) is down: no completion for failover_ns while
 * work requests were in flight on it (a cut link, a dead switch port).
 * Its work requests are abandoned and posted again over other lanes, with
 * the same CQ data (so the receiver counts an immediate once, see
 * token_seen); the lane's connection is dropped (fi_av_remove: what the
 * provider still queues for it is never sent) and its address inserted
 * again for the probes that bring it back. */
static void lane_down(atx_engine *e, uint64_t pi, int l, uint64_t t) {
    atx_peer *p = &e->peers[pi];
    atx_nic *n = &e->nics[l];
    p->down[l] = 1;
    p->down_at[l] = t;
    p->probing[l] = 0;
    n->stats.lanes_down++;
    for (size_t i = 0; i < n->tx_depth; i++) {
        atx_ctx *c = &n->tx_ctx[i];
        atx_op *op;
        if (!c->used || c->abandoned || c->probe || c->peer != pi) continue;
        c->abandoned = 1;
        op = c->op;
        op->inflight--;
        if (op->status == 0) {
            if (op->nretry == op->retry_cap) {
                uint32_t cap = op->retry_cap ? op->retry_cap * 2 : 8;
                void *nr = realloc(op->retry, cap * sizeof(*op->retry));
                if (!nr) {
                    op_fail(op, -FI_ENOMEM, 0, "out of memory re-posting after failover");
                    op_check(e, op);
                    continue;
                }
                op->retry = nr;
                op->retry_cap = cap;
            }
            op->retry[op->nretry].wr = c->wr;
            op->retry[op->nretry].data = c->data;
            op->nretry++;
            n->stats.wrs_resent++;
        }
        if (!op->in_post_q) op_check(e, op);
    }
    p->lane_inflight[l] = 0;
    lane_reconnect(e, p, l);
}

/* Probe a down lane: a MSG_PROBE over it; its completion brings it back. */
static void lane_probe(atx_engine *e, uint64_t pi, int l) {
    atx_peer *p = &e->peers[pi];
    atx_nic *n = &e->nics[l];
    static const char probe = MSG_PROBE;
    atx_ctx *c;
    int rc;
    if (!n->tx_free || n->pub.mr_local) return;   /* (mr_local: no descriptor for it) */
    c = ctx_get(n);
    call_enter(e);
    rc = (int)fi_send(n->ep, &probe, 1, NULL, p->fa[l][p->route[l][0]], c);
    call_exit(e);
    if (rc) {
        ctx_put(n, c);
        return;
    }
    c->op = NULL;
    c->probe = 1;
    c->peer = pi;
    c->bytes = 0;
    c->wr = 0;
    p->probing[l] = 1;
    p->probe_at[l] = now_ns();
}

/* A fresh connection for lane (p, l): the provider forgets what it still
 * queued for the old one (it is never sent) and connects anew. */
static void lane_reconnect(atx_engine *e, atx_peer *p, int l) {
    atx_nic *n = &e->nics[l];
    for (int k = 0; k < p->nroute[l]; k++) {
        int r = p->route[l][k];
        fi_addr_t fa = FI_ADDR_NOTAVAIL;
        fi_av_remove(n->av, &p->fa[l][r], 1, 0);
        if (fi_av_insert(n->av, p->names[r], 1, &fa, 0, NULL) == 1) p->fa[l][r] = fa;
    }
}

/* Lanes with work and no progress go down; down lanes get probed. */
static void scan_lanes(atx_engine *e, uint64_t t) {
    /* failover moves work between our NICs; the endpoints of one NIC share
     * its link and its peers' fate, so they do not fail over for each other
     * (and on shm, dropping a connection with requests in flight unmaps the
     * peer's region under them) */
    if (e->ndoms < 2) return;
    for (uint64_t pi = 0; pi < e->npeers; pi++) {
        atx_peer *p = &e->peers[pi];
        if (p->slot == SLOT_WAIT && t - p->hello_at > e->cfg.failover_ns)
            p->slot = SLOT_NONE;   /* no answer: immediates go without tokens */
        for (int l = 0; l < e->nnics; l++) {
            if (!p->down[l]) {
                if (p->lane_inflight[l] && t > p->lane_since[l] &&
                    t - p->lane_since[l] > e->cfg.failover_ns) {
                    /* only if another lane to this peer is up */
                    int other = 0;
                    for (int k = 0; k < e->nnics; k++) other |= k != l && !p->down[k];
                    if (other) lane_down(e, pi, l, t);
                }
            } else if (!p->probing[l]) {
                if (t - p->down_at[l] > ATX_PROBE_NS) lane_probe(e, pi, l);
            } else if (t - p->probe_at[l] > ATX_PROBE_STALL_NS) {
                /* the probe hangs in a connection attempt: start afresh (a
                 * late success of the old probe still brings the lane up) */
                lane_reconnect(e, p, l);
                p->probing[l] = 0;
                p->down_at[l] = t;
            }
        }
    }
}

/* One round of progress: post queued work, poll every CQ, publish the
 * records.  Called with prog_lock held. */
static size_t progress_once_at(atx_engine *e, int rounds, uint64_t t) {
    size_t work = 0;
    e->now = t;   /* the clock of this round (lane_since, last_ok) */
    work += post_pending(e);
    for (int i = 0; i < e->nnics; i++) work += poll_cq(e, &e->nics[i], rounds);
    work += post_pending(e);
    batch_flush(e);
    return work;
}

static size_t progress_once(atx_engine *e, int rounds) {
    return progress_once_at(e, rounds, now_ns());
}

/* Every ATX_STALL_SCAN_NS, whoever progresses (the worker, or the app's
 * loop while it drives) looks for stalled lanes and operations.  Called
 * with prog_lock held. */
static void scan_if_due(atx_engine *e, uint64_t t) {
    if (t - e->last_scan <= ATX_STALL_SCAN_NS) return;
    e->last_scan = t;
    if (!e->live && !e->npeers) return;
    scan_lanes(e, t);
    scan_stalls(e, t);
    post_pending(e);
    batch_flush(e);
}

/* Work queued or at a NIC: completions are still to come.  Under prog_lock. */
static int work_in_flight(const atx_engine *e) {
    int busy = e->post_head != NULL;
    for (int i = 0; i < e->nnics; i++) busy |= e->nics[i].tx_used > 0;
    return busy;
}

void atx_app_polling(atx_engine *e, int on) {
    if (on) __atomic_store_n(&e->app_work_ts, now_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(&e->app_polling, on, __ATOMIC_SEQ_CST);
    if (!on) kick_worker(e);   /* the app stops polling: the worker takes over now */
}

int atx_app_poll(atx_engine *e, uint64_t window_ns) {
    uint64_t t = now_ns();
    int r = 0;
    /* stopping: leave the lock to the worker's shutdown (a mutex is not
     * fair: a thread polling in a loop could starve it) */
    if (__atomic_load_n(&e->stop, __ATOMIC_ACQUIRE)) return atx_pending(e) ? ATX_POLL_RECORDS : 0;
    /* fresh before the poll as well as after: one poll of a stream on tcp
     * moves megabytes through a socket and takes a millisecond, and the
     * worker must not take that for a loop that stopped polling */
    __atomic_store_n(&e->app_ts, t, __ATOMIC_RELAXED);
    if (pthread_mutex_trylock(&e->prog_lock) == 0) {
        size_t work = 0;
        __atomic_add_fetch(&e->app_inside, 1, __ATOMIC_RELAXED);
        if (!e->dead) {
            work = progress_once_at(e, 4, t);
            scan_if_due(e, t);
        }
        __atomic_sub_fetch(&e->app_inside, 1, __ATOMIC_RELAXED);
        t = now_ns();
        if (work) gap_note(&e->app_work_ts, &e->app_gap, t);
        e->app_inflight = work_in_flight(e);
        pthread_mutex_unlock(&e->prog_lock);
    }
    __atomic_store_n(&e->app_ts, t, __ATOMIC_RELAXED);
    if (atx_pending(e)) {
        r |= ATX_POLL_RECORDS;
        e->app_work_ts = t;
    }
    /* with work requests in flight, their completions will come: keep
     * polling until none came for ATX_INFLIGHT_POLL_NS.  Completions come in
     * bursts: the shm target copies every queued write while it holds its
     * region lock, 16 x 4 MiB in 6 ms, and the initiator sees none of them
     * until it lets go.  Stopping there handed the NICs to the worker, whose
     * spinning took a core from the target's copy (72 hand-overs per GiB). */
    if (t - e->app_work_ts < (e->app_inflight ? ATX_INFLIGHT_POLL_NS
                                               : gap_window(window_ns, e->app_gap)))
        r |= ATX_POLL_AGAIN;
    return r;
}

uint64_t atx_now_ns(void) { return now_ns(); }

int atx_app_spin(atx_engine *e, uint64_t window_ns, uint64_t max_ns) {
    uint64_t end = now_ns() + max_ns;
    int r;
    do {
        r = atx_app_poll(e, window_ns);
        if ((r & ATX_POLL_RECORDS) || !(r & ATX_POLL_AGAIN)) break;
        __builtin_ia32_pause();
    } while (__atomic_load_n(&e->app_ts, __ATOMIC_RELAXED) < end &&
             !__atomic_load_n(&e->stop, __ATOMIC_ACQUIRE));
    return r;
}

size_t atx_progress(atx_engine *e) {
    size_t work = 0;
    if (pthread_mutex_trylock(&e->prog_lock) != 0) return 0;
    if (!e->dead) {
        work = progress_once(e, 4);
        __atomic_store_n(&e->app_ts, e->now, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&e->prog_lock);
    return work;
}

/* Sleep until something is posted (submit/atx_app_polling wake us), a CQ
 * fd fires (if use_cq_fds) or the timeout passes.  Called without prog_lock. */
static void worker_sleep(atx_engine *e, uint64_t timeout_ns, int use_cq_fds) {
    struct pollfd pfd[ATX_MAX_NICS + 1];
    int nfd = 0;
    struct timespec ts;
    uint64_t seen = __atomic_load_n(&e->submitted, __ATOMIC_SEQ_CST);
    rec_notify_due(e, 1);   /* never sleep on a held-back wake-up */
    __atomic_store_n(&e->sleeping, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&e->stop, __ATOMIC_SEQ_CST) ||
        __atomic_load_n(&e->submitted, __ATOMIC_SEQ_CST) != seen)
        goto out;   /* something was posted meanwhile: look at it first */

    pfd[nfd].fd = e->wake_fd;
    pfd[nfd].events = POLLIN;
    nfd++;
    if (use_cq_fds) {
        int rc = FI_SUCCESS;
        /* arm, then check again: never block on a CQ with entries (each
         * NIC has a fabric of its own) */
        pthread_mutex_lock(&e->prog_lock);
        for (int i = 0; i < e->nnics && rc == FI_SUCCESS; i++) {
            struct fid *f = &e->nics[i].cq->fid;
            rc = fi_trywait(e->nics[i].fabric, &f, 1);
        }
        pthread_mutex_unlock(&e->prog_lock);
        if (rc != FI_SUCCESS) goto out;
        for (int i = 0; i < e->nnics; i++) {
            pfd[nfd].fd = e->nics[i].cq_fd;
            pfd[nfd].events = POLLIN;
            nfd++;
        }
    }
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ULL);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ULL);
    ppoll(pfd, (nfds_t)nfd, &ts, NULL);
    e->nics[0].stats.wakeups++;
out:
    {
        uint64_t v;
        ssize_t r = read(e->wake_fd, &v, sizeof(v));
        (void)r;
    }
    __atomic_store_n(&e->sleeping, 0, __ATOMIC_SEQ_CST);
}

/* Closing a tcp engine while a peer writes into it.
 *
 * libfabric 1.17's tcp;ofi_rxm dereferences a NULL context (in
 * rxm_handle_comp_error, from rxm_flush_msg_cq) when an endpoint is closed
 * while a peer's write with remote CQ data is half received: tcp reports
 * that write cancelled, and a remote write has no context.  tcp frees a
 * half-received write without that report only when its socket fails
 * under it.  So before the endpoints close:
 *  1. the regions are closed: a peer's next write fails tcp's key check,
 *     which drops the connection (nothing half received then);
 *  2. every connected socket of our CQs is shut for reading: tcp reads
 *     what the kernel holds, then sees the end of the stream in the middle
 *     of any write, frees it silently and disables that connection, which
 *     takes its socket out of the CQ's wait set;
 *  3. we poll until no connected socket is left in those sets (at most
 *     ATX_CLOSE_SETTLE_NS).
 * The sockets are found through /proc/self/fdinfo of the CQ's wait fd (an
 * epoll set that holds tcp's own CQ epoll set, which holds the sockets):
 * only this engine's, and open while we hold prog_lock.  Without a wait
 * fd, step 2 is skipped and 3 becomes: poll until nothing arrived for
 * ATX_CLOSE_QUIET_NS.  Under prog_lock. */

/* The fds an epoll fd watches (from /proc/self/fdinfo), at most max. */
static int epoll_members(int epfd, int *out, int max) {
    char path[64], line[256];
    FILE *f;
    int n = 0;
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", epfd);
    f = fopen(path, "re");
    if (!f) return 0;
    while (n < max && fgets(line, sizeof(line), f)) {
        int fd;
        if (sscanf(line, "tfd: %d", &fd) == 1) out[n++] = fd;
    }
    fclose(f);
    return n;
}

static int is_epoll_fd(int fd) {
    char path[64], target[64];
    ssize_t k;
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    k = readlink(path, target, sizeof(target) - 1);
    if (k <= 0) return 0;
    target[k] = 0;
    return strcmp(target, "anon_inode:[eventpoll]") == 0;
}

/* A connected TCP socket (not a listener, not tcp's own signal socketpair). */
static int is_connected_tcp(int fd) {
    struct stat st;
    struct sockaddr_storage peer;
    socklen_t plen = sizeof(peer);
    int v = 0;
    socklen_t vlen = sizeof(v);
    if (fstat(fd, &st) || !S_ISSOCK(st.st_mode)) return 0;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &vlen) || (v != AF_INET && v != AF_INET6))
        return 0;
    vlen = sizeof(v);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &vlen) || v != SOCK_STREAM) return 0;
    vlen = sizeof(v);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &vlen) || v) return 0;
    return getpeername(fd, (struct sockaddr *)&peer, &plen) == 0;
}

/* The connected TCP sockets watched by epoll fd `epfd` or by the epoll sets
 * it watches (two levels down); shut each for reading if `shut`.  Returns
 * how many there are. */
static int cq_sockets(int epfd, int depth, int shut) {
    int fds[1024], n = epoll_members(epfd, fds, 1024), count = 0;
    for (int i = 0; i < n; i++) {
        if (depth < 2 && is_epoll_fd(fds[i])) {
            count += cq_sockets(fds[i], depth + 1, shut);
        } else if (is_connected_tcp(fds[i])) {
            count++;
            if (shut) shutdown(fds[i], SHUT_RD);
        }
    }
    return count;
}

/* The connected TCP sockets of all our CQs (shut each for reading if `shut`). */
static int engine_sockets(atx_engine *e, int shut) {
    int count = 0;
    for (int i = 0; i < e->nnics; i++)
        if (e->nics[i].cq) count += cq_sockets(e->nics[i].cq_fd, 0, shut);
    return count;
}

static void close_regions_then_settle(atx_engine *e) {
    uint64_t t0, last;
    int fds = 1;
    for (atx_reg *r = e->regs; r; r = r->next) reg_close_mrs(r);
    for (int i = 0; i < e->nnics; i++)
        if (e->nics[i].cq_fd < 0 || !is_epoll_fd(e->nics[i].cq_fd)) fds = 0;
    if (fds) engine_sockets(e, 1);
    t0 = last = now_ns();
    for (;;) {
        size_t work = 0;
        uint64_t t;
        for (int i = 0; i < e->nnics; i++) work += poll_cq(e, &e->nics[i], 4);
        t = now_ns();
        if (work) last = t;
        if (t - t0 >= ATX_CLOSE_SETTLE_NS) break;
        if (fds ? !engine_sockets(e, 0) : t - last >= ATX_CLOSE_QUIET_NS) break;
        if (!work) {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
}

/* Stop: post nothing more, let the work requests already posted finish
 * (bounded by ATX_DRAIN_NS: a peer that is alive answers quickly; the shm
 * provider touches a peer's mapped region until its requests complete),
 * close the endpoints (after this no NIC touches any buffer), then fail
 * every operation that has not completed. */
static void shutdown_worker(atx_engine *e) {
    atx_op *op;
    uint64_t deadline = now_ns() + ATX_DRAIN_NS;
    pthread_mutex_lock(&e->prog_lock);
    e->dead = 1;
    if (e->keytab) atx_keytab_shut(e->keytab);   /* peers copy into nothing of ours now */
    for (op = e->post_head; op; op = op->next) {
        op->in_post_q = 0;
        op_fail(op, -FI_ECANCELED, 0, "engine closed");
    }
    e->post_head = e->post_tail = NULL;
    for (;;) {
        int busy = 0;
        for (int i = 0; i < e->nnics; i++) {
            poll_cq(e, &e->nics[i], 4);
            busy |= e->nics[i].tx_used > 0;
        }
        if (!busy || now_ns() > deadline) break;
        sched_yield();
    }
    if (e->regions_first) close_regions_then_settle(e);
    /* the watch reads our regions: out of its list before they go */
    if (e->is_shm) watch_remove(e);
    pthread_mutex_lock(&g_lifecycle_lock);
    for (int i = 0; i < e->nnics; i++) {
        if (e->nics[i].ep) {
            fi_close(&e->nics[i].ep->fid);
            e->nics[i].ep = NULL;
        }
    }
    pthread_mutex_unlock(&g_lifecycle_lock);
    while ((op = e->live)) {
        op_fail(op, -FI_ECANCELED, 0, "engine closed");
        op->inflight = 0;
        op->in_post_q = 0;
        op_complete(e, op);
    }
    batch_flush(e);
    pthread_mutex_unlock(&e->prog_lock);
}

/* The progress worker.  Policy (2-core machines in mind):
 *  - work found: go round again at once;
 *  - the application thread progressed inline within ATX_APP_QUIET_NS: it
 *    drives the NIC, so sleep briefly instead of competing for the core;
 *  - within spin_ns, or 4 typical gaps between completions (at most
 *    4 ms), of the last activity: spin (completions and incoming data come
 *    in bursts; a large write completes only every few hundred us);
 *  - then block on the CQ wait fds where the provider has them, or poll
 *    with a sleep that backs off from 20 us to 1 ms, and to 5 ms after
 *    100 ms idle (measured: an idle engine costs under 1.5% of a core). */
static void *worker_main(void *arg) {
    atx_engine *e = arg;
    uint64_t last_activity = now_ns(), gap = 0;
    uint64_t sleep_ns = ATX_SLEEP_MIN_NS;
    uint64_t drive_nap = ATX_APP_STALE_NS;   /* nap while the app drives: backs off */
    int any_fd = 1;
    for (int i = 0; i < e->nnics; i++)
        if (e->nics[i].cq_fd < 0) any_fd = 0;

    /* short sleeps must be short: the default timer slack is 50 us */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    pthread_setname_np(pthread_self(), "atx-worker");   /* for top -H, perf, gdb */
    if (e->cfg.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(e->cfg.cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }

    for (;;) {
        size_t work;
        uint64_t t, app_ts;
        int busy;
        int app_drives;
        if (__atomic_load_n(&e->stop, __ATOMIC_ACQUIRE)) break;
        t = now_ns();
        /* the application's loop polls the NICs (drains the records and
         * looks for stalls): stand back; if its polls stop for
         * ATX_APP_STALE_NS (its loop runs something long), progress for it */
        /* (inside a poll or post, an app thread may wait milliseconds: the
         * shm provider's post spins on the target's region lock while the
         * target copies; a worker that took that for a stalled loop spun on
         * the same lock) */
        app_drives = __atomic_load_n(&e->app_polling, __ATOMIC_SEQ_CST) &&
                     (__atomic_load_n(&e->app_inside, __ATOMIC_RELAXED) ||
                      t - __atomic_load_n(&e->app_ts, __ATOMIC_RELAXED) < ATX_APP_STALE_NS);
        if (app_drives) {
            /* woken when it stops polling; else look again in 1 ms, then
             * 2 and 4 ms while the app keeps driving: each look is a
             * wake-up that takes a core from a busy thread (on a tcp
             * stream, 950 a second cost the writer 1.2% of a core).  A
             * loop that then goes busy is taken over within 5 ms (a
             * backoff to 8 ms, tried in session 5, seemed to cost tcp
             * 256 KiB streams when a receiver's loop went stale) */
            worker_sleep(e, drive_nap, 0);
            if (drive_nap < ATX_APP_DRIVE_NAP_MAX_NS) drive_nap *= 2;
            continue;
        }
        drive_nap = ATX_APP_STALE_NS;
        if (pthread_mutex_trylock(&e->prog_lock) != 0) {
            /* the application is progressing inline right now; if its loop
             * polls, it drives (a poll can take a millisecond): sleep until
             * it stops polling, else look again soon */
            worker_sleep(e, __atomic_load_n(&e->app_polling, __ATOMIC_SEQ_CST)
                                ? ATX_APP_STALE_NS : ATX_SLEEP_MIN_NS, 0);
            continue;
        }
        /* one clock read a round (a spinning worker read it three times:
         * 8% of a shm target's time, in perf) */
        work = progress_once_at(e, 64, t);
        scan_if_due(e, t);
        rec_notify_due(e, 0);
        app_ts = e->app_ts;
        busy = work_in_flight(e);
        pthread_mutex_unlock(&e->prog_lock);

        if (work) {
            gap_note(&last_activity, &gap, t);
            sleep_ns = ATX_SLEEP_MIN_NS;
            continue;
        }
        if (t - app_ts < ATX_APP_QUIET_NS) {
            worker_sleep(e, ATX_APP_QUIET_NS, 0);
            continue;
        }
        if (t - last_activity < gap_window(e->spin_ns, gap)) {
            __builtin_ia32_pause();
            continue;
        }
        if (any_fd) {
            /* the CQ fds wake us for completions and incoming data */
            worker_sleep(e, (uint64_t)ATX_BLOCK_MS * 1000000ULL, 1);
        } else {
            /* busy: 100 us; idle: 1 ms; idle for long: ATX_SLEEP_DEEP_NS */
            uint64_t cap = busy ? ATX_SLEEP_MAX_NS / 10
                         : t - last_activity > ATX_DEEP_IDLE_NS ? ATX_SLEEP_DEEP_NS
                         : ATX_SLEEP_MAX_NS;
            worker_sleep(e, sleep_ns, 0);
            sleep_ns *= 2;
            if (sleep_ns > cap) sleep_ns = cap;
        }
    }
    shutdown_worker(e);
    return NULL;
}

/* ---------------------------------------------------------- lifecycle */

static int open_nic(atx_engine *e, atx_nic *n, struct fi_info *info, char *err, size_t errlen) {
    struct fi_cq_attr cq_attr;
    struct fi_av_attr av_attr;
    int rc;

    n->info = fi_dupinfo(info);
    n->cq_fd = -1;
    rc = fi_fabric(info->fabric_attr, &n->fabric, NULL);
    if (rc) { seterr(err, errlen, "fi_fabric", rc); return rc; }
    rc = fi_domain(n->fabric, info, &n->domain, NULL);
    if (rc) { seterr(err, errlen, "fi_domain", rc); return rc; }

    memset(&cq_attr, 0, sizeof(cq_attr));
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.size = info->tx_attr->size + info->rx_attr->size + (size_t)e->cfg.msg_count + 64;
    cq_attr.wait_obj = e->cfg.no_wait_fd ? FI_WAIT_NONE : FI_WAIT_FD;
    rc = e->cfg.no_wait_fd ? -FI_ENOSYS : fi_cq_open(n->domain, &cq_attr, &n->cq, NULL);
    if (rc == 0) {
        int fd = -1;
        if (fi_control(&n->cq->fid, FI_GETWAIT, &fd) == 0 && fd >= 0) {
            n->cq_fd = fd;
        } else {
            fi_close(&n->cq->fid);
            n->cq = NULL;
            rc = -FI_ENOSYS;
        }
    }
    if (rc) {
        cq_attr.wait_obj = FI_WAIT_NONE;
        rc = fi_cq_open(n->domain, &cq_attr, &n->cq, NULL);
        if (rc) { seterr(err, errlen, "fi_cq_open", rc); return rc; }
    }
    memset(&av_attr, 0, sizeof(av_attr));
    av_attr.type = FI_AV_TABLE;
    rc = fi_av_open(n->domain, &av_attr, &n->av, NULL);
    if (rc) { seterr(err, errlen, "fi_av_open", rc); return rc; }
    rc = fi_endpoint(n->domain, info, &n->ep, NULL);
    if (rc) { seterr(err, errlen, "fi_endpoint", rc); return rc; }
    rc = fi_ep_bind(n->ep, &n->av->fid, 0);
    if (!rc) rc = fi_ep_bind(n->ep, &n->cq->fid, FI_TRANSMIT | FI_RECV);
    if (rc) { seterr(err, errlen, "fi_ep_bind", rc); return rc; }
    rc = fi_enable(n->ep);
    if (rc) { seterr(err, errlen, "fi_enable", rc); return rc; }

    /* public facts */
    snprintf(n->pub.name, sizeof(n->pub.name), "%s",
             info->domain_attr->name ? info->domain_attr->name : "?");
    snprintf(n->pub.fabric, sizeof(n->pub.fabric), "%s",
             info->fabric_attr->name ? info->fabric_attr->name : "?");
    if (info->nic && info->nic->link_attr) n->pub.link_speed = info->nic->link_attr->speed;
    n->pub.mr_mode = (uint64_t)info->domain_attr->mr_mode;
    n->pub.mode = info->mode;
    n->pub.max_msg_size = info->ep_attr->max_msg_size;
    n->pub.inject_size = info->tx_attr->inject_size;
    n->pub.cq_data_size = info->domain_attr->cq_data_size;
    n->pub.tx_size = info->tx_attr->size;
    n->pub.wait_fd = n->cq_fd >= 0;
    n->pub.virt_addr = (info->domain_attr->mr_mode & FI_MR_VIRT_ADDR) != 0;
    n->pub.prov_key = (info->domain_attr->mr_mode & FI_MR_PROV_KEY) != 0;
    n->pub.mr_local = (info->domain_attr->mr_mode & FI_MR_LOCAL) != 0;
    n->pub.mr_endpoint = (info->domain_attr->mr_mode & FI_MR_ENDPOINT) != 0;
    n->pub.rx_cq_data = (info->mode & FI_RX_CQ_DATA) != 0;
    n->pub.delivery_complete = e->cfg.delivery_complete;
    n->pub.data_progress_manual = info->domain_attr->data_progress == FI_PROGRESS_MANUAL;
    n->imm_flag = n->pub.cq_data_size >= 8 ? (1ULL << 32) : 0;

    /* transmit contexts: bound the WRs in flight by the queue depth */
    n->tx_depth = info->tx_attr->size ? info->tx_attr->size : 256;
    if (e->cfg.tx_depth && e->cfg.tx_depth < n->tx_depth) n->tx_depth = e->cfg.tx_depth;
    if (n->tx_depth > 4096) n->tx_depth = 4096;
    n->tx_ctx = calloc(n->tx_depth, sizeof(atx_ctx));
    if (!n->tx_ctx) return -FI_ENOMEM;
    for (size_t i = 0; i < n->tx_depth; i++) {
        n->tx_ctx[i].kind = CTX_TX;
        n->tx_ctx[i].next_free = n->tx_free;
        n->tx_free = &n->tx_ctx[i];
    }

    /* receive buffers: control messages, and remote CQ data under FI_RX_CQ_DATA */
    n->rx_count = e->cfg.msg_count;
    n->rx_block = malloc((size_t)n->rx_count * e->rx_size);
    n->rx_ctx = calloc((size_t)n->rx_count, sizeof(atx_ctx));
    if (!n->rx_block || !n->rx_ctx) return -FI_ENOMEM;
    if (n->pub.mr_local) {
        rc = fi_mr_reg(n->domain, n->rx_block, (size_t)n->rx_count * e->rx_size, FI_RECV, 0,
                       random_key(n), 0, &n->rx_mr, NULL);
        if (rc) { seterr(err, errlen, "fi_mr_reg (receive buffers)", rc); return rc; }
        if (n->pub.mr_endpoint) {
            rc = fi_mr_bind(n->rx_mr, &n->ep->fid, 0);
            if (!rc) rc = fi_mr_enable(n->rx_mr);
            if (rc) { seterr(err, errlen, "fi_mr_bind (receive buffers)", rc); return rc; }
        }
        n->rx_desc = fi_mr_desc(n->rx_mr);
    }
    for (int i = 0; i < n->rx_count; i++) {
        atx_ctx *c = &n->rx_ctx[i];
        c->kind = CTX_RX;
        c->buf = n->rx_block + (size_t)i * e->rx_size;
        rc = post_rx(e, n, c);
        if (rc) { seterr(err, errlen, "fi_recv", rc); return rc; }
    }
    return 0;
}

static void close_nic(atx_nic *n) {
    if (n->ep) fi_close(&n->ep->fid);
    if (n->rx_mr) fi_close(&n->rx_mr->fid);
    if (n->av) fi_close(&n->av->fid);
    if (n->cq) fi_close(&n->cq->fid);
    if (n->domain) fi_close(&n->domain->fid);
    if (n->fabric) fi_close(&n->fabric->fid);
    if (n->info) fi_freeinfo(n->info);
    free(n->rx_block);
    free(n->rx_ctx);
    free(n->tx_ctx);
    memset(n, 0, sizeof(*n));
}

static struct fi_info *make_hints(const atx_config *cfg) {
    struct fi_info *h = fi_allocinfo();
    if (!h) return NULL;
    h->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_READ | FI_REMOTE_READ | FI_MSG | FI_SEND |
              FI_RECV;   /* reads: regions registered with remote_read=True */
    h->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA;
    h->ep_attr->type = FI_EP_RDM;
    h->domain_attr->mr_mode =
        FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    h->domain_attr->threading = FI_THREAD_DOMAIN;
    /* we always progress (worker + inline); the sockets provider's own
     * progress threads stall with deep windows (seen here) */
    h->domain_attr->data_progress = FI_PROGRESS_MANUAL;
    h->fabric_attr->prov_name = strdup(cfg->provider);
    if (cfg->ndomains == 1 && cfg->domains[0] && cfg->domains[0][0])
        h->domain_attr->name = strdup(cfg->domains[0]);
    return h;
}

/* A tunable from the environment (times `scale`), or its default. */
static uint64_t env_u64(const char *name, uint64_t scale, uint64_t dflt) {
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) * scale : dflt;
}

/* The fi_info of domain `name` (NULL: the first), preferring IPv4. */
static struct fi_info *pick_domain(struct fi_info *list, const char *name) {
    for (int pass = 0; pass < 2; pass++) {
        for (struct fi_info *i = list; i; i = i->next) {
            /* layered providers do not always filter by domain name */
            if (name && (!i->domain_attr->name || strcmp(i->domain_attr->name, name) != 0))
                continue;
            if (pass == 0 && i->addr_format != FI_SOCKADDR_IN) continue;
            return i;
        }
    }
    return NULL;
}

int atx_engine_create(const atx_config *cfg, atx_engine **out, char *err, size_t errlen) {
    struct fi_info *hints, *list = NULL, *pick[ATX_MAX_NICS];
    atx_engine *e;
    int rc, ndom = cfg->ndomains > 0 ? cfg->ndomains : 1, known = 1;
    int neps = cfg->endpoints > 0 ? cfg->endpoints : 1;

    *out = NULL;
    if (cfg->ndomains < 0 || cfg->ndomains > ATX_MAX_NICS) {
        snprintf(err, errlen, "%d NICs asked for (1..%d allowed)", cfg->ndomains, ATX_MAX_NICS);
        return -FI_EINVAL;
    }
    if (cfg->endpoints < 0 || ndom * neps > ATX_MAX_NICS) {
        snprintf(err, errlen, "%d NIC(s) x %d endpoint(s) asked for (at most %d endpoints)",
                 ndom, cfg->endpoints, ATX_MAX_NICS);
        return -FI_EINVAL;
    }
    hints = make_hints(cfg);
    if (!hints) return -FI_ENOMEM;
    rc = fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &list);
    fi_freeinfo(hints);
    if (rc || !list) {
        snprintf(err, errlen, "no libfabric provider matches provider=%s domain=%s: %s",
                 cfg->provider, cfg->ndomains == 1 ? cfg->domains[0] : "(any)",
                 fi_strerror(rc < 0 ? -rc : FI_ENODATA));
        return rc ? rc : -FI_ENODATA;
    }
    for (int d = 0; d < ndom; d++) {
        const char *name = cfg->ndomains ? cfg->domains[d] : NULL;
        pick[d] = pick_domain(list, name && name[0] ? name : NULL);
        if (!pick[d]) {
            snprintf(err, errlen, "provider %s has no NIC (domain) named %s", cfg->provider,
                     name ? name : "?");
            fi_freeinfo(list);
            return -FI_ENODATA;
        }
        for (int j = 0; j < d; j++) {
            if (pick[j] == pick[d]) {
                snprintf(err, errlen, "NIC %s is listed twice", name ? name : "?");
                fi_freeinfo(list);
                return -FI_EINVAL;
            }
        }
    }

    e = calloc(1, sizeof(*e));
    if (!e) {
        fi_freeinfo(list);
        return -FI_ENOMEM;
    }
    e->cfg = *cfg;
    e->ndoms = ndom;
    snprintf(e->provider, sizeof(e->provider), "%s", cfg->provider);
    e->is_shm = strcmp(e->provider, "shm") == 0;
    e->regions_first = strncmp(e->provider, "tcp", 3) == 0 && strstr(e->provider, "ofi_rxm");
    e->cfg.provider = e->provider;
    memset(e->cfg.domains, 0, sizeof(e->cfg.domains));
    e->cfg.ndomains = 0;
    if (e->cfg.msg_size == 0) e->cfg.msg_size = 65536;
    if (e->cfg.msg_count <= 0) e->cfg.msg_count = 64;
    e->rx_size = e->cfg.msg_size + 1 > sizeof(e->hello) ? e->cfg.msg_size + 1 : sizeof(e->hello);
    if (e->cfg.failover_ns == 0) e->cfg.failover_ns = ATX_FAILOVER_NS;
    if (e->cfg.stripe == 0) e->cfg.stripe = ATX_STRIPE;
    if (e->cfg.nic_budget == 0) e->cfg.nic_budget = ATX_NIC_BUDGET;
    if (e->cfg.peer_timeout_ns == 0) e->cfg.peer_timeout_ns = ATX_PEER_TIMEOUT_NS;
    e->max_counters = env_u64("AIOTRANSFER_MAX_IMM_VALUES", 1, ATX_MAX_COUNTERS);
    e->ctab_keep = e->max_counters / 2 < ATX_CTAB_KEEP ? e->max_counters / 2 : ATX_CTAB_KEEP;
    e->ctab_key = (uint32_t)random_u64();
    e->coalesce_ns = env_u64("AIOTRANSFER_COALESCE_US", 1000, ATX_COALESCE_NS);
    e->spin_ns = env_u64("AIOTRANSFER_SPIN_US", 1000, ATX_SPIN_NS);
    e->copy_min = env_u64("AIOTRANSFER_COPY_LANE_MIN", 1, ATX_COPY_MIN);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&e->prog_lock, NULL);
    pthread_mutex_init(&e->rec_lock, NULL);
    pthread_mutex_init(&e->imm_lock, NULL);
    pthread_mutex_init(&e->join_lock, NULL);

    /* NIC d's endpoint k is our NIC d * neps + k: each endpoint has its own
     * fabric, domain, CQ and AV, as a NIC of its own would */
    for (int i = 0; i < ndom * neps; i++) {
        pthread_mutex_lock(&g_lifecycle_lock);
        rc = open_nic(e, &e->nics[i], pick[i / neps], err, errlen);
        pthread_mutex_unlock(&g_lifecycle_lock);
        e->nnics = i + 1;   /* destroy closes what was opened */
        if (rc) {
            fi_freeinfo(list);
            atx_engine_destroy(e);
            return rc;
        }
        e->nics[i].pub.endpoint = i % neps;
        /* shm: endpoint 0 of each NIC is a copy lane (post_one), where the
         * provider lets the initiator copy (FI_MR_VIRT_ADDR, no RMA order) */
        if (e->cfg.copy_lane && e->is_shm && neps >= 2 && i % neps == 0 &&
            e->nics[i].pub.virt_addr && !(e->nics[i].info->tx_attr->msg_order & ATX_RMA_ORDER))
            e->nics[i].pub.copy_lane = 1;
        if (e->cfg.max_chunk == 0 || e->cfg.max_chunk > e->nics[i].pub.max_msg_size)
            e->cfg.max_chunk = e->nics[i].pub.max_msg_size;
        /* selector weight: the link speed in Mbit/s where libfabric knows it */
        e->nics[i].weight = e->nics[i].pub.link_speed / 1000000u;
        if (!e->nics[i].weight) known = 0;
    }
    fi_freeinfo(list);
    if (!known)
        for (int i = 0; i < e->nnics; i++) e->nics[i].weight = 1;
    /* our MSG_HELLO: engine id, then each NIC's endpoint name */
    {
        size_t pos = 0;
        e->hello[pos++] = MSG_HELLO;
        memcpy(e->hello + pos, &e->cfg.engine_id, 8);
        pos += 8;
        e->hello[pos++] = (char)e->nnics;
        for (int d = 0; d < e->nnics; d++) {
            size_t nl = 256;
            uint16_t l16;
            if (fi_getname(&e->nics[d].ep->fid, e->hello + pos + 2, &nl) != 0 || nl > 256) {
                pos = 0;   /* no hello: immediates go without tokens */
                break;
            }
            l16 = (uint16_t)nl;
            memcpy(e->hello + pos, &l16, 2);
            pos += 2 + nl;
        }
        e->hello_len = pos;
    }
    if (e->cfg.max_chunk > (1ULL << 30)) e->cfg.max_chunk = 1ULL << 30;
    for (int i = 0; e->is_shm && i < e->nnics; i++) {
        /* our region: mapped from /dev/shm/<endpoint name without "fi_shm://"> */
        char name[256];
        size_t len = sizeof(name) - 1;
        memset(name, 0, sizeof(name));
        if (fi_getname(&e->nics[i].ep->fid, name, &len) == 0 &&
            strncmp(name, "fi_shm://", 9) == 0)
            e->own[i].head = atx_shm_own_region(name + 9);
    }

    /* shm: the table of our regions that peers' copy lanes check (without
     * it they never take the copy lane to us) */
    if (e->is_shm && e->cfg.engine_id) e->keytab = atx_keytab_create(e->cfg.engine_id);
    rc = pthread_create(&e->thread, NULL, worker_main, e);
    if (rc) {
        snprintf(err, errlen, "pthread_create: %s", strerror(rc));
        atx_engine_destroy(e);
        return -FI_EOTHER;
    }
    e->thread_started = 1;
    if (e->is_shm && (rc = watch_add(e)) != 0) {
        snprintf(err, errlen, "starting the shm watch thread: %s", strerror(rc));
        atx_engine_destroy(e);
        return -FI_EOTHER;
    }
    *out = e;
    return 0;
}

int atx_engine_notify_fd(atx_engine *e) { return e->notify_fd; }
int atx_engine_nic_count(atx_engine *e) { return e->nnics; }
const atx_nic_info *atx_engine_nic(atx_engine *e, int i) {
    return (i >= 0 && i < e->nnics) ? &e->nics[i].pub : NULL;
}

int atx_engine_getname(atx_engine *e, int nic, void *buf, size_t *len) {
    if (nic < 0 || nic >= e->nnics || !e->nics[nic].ep) return -FI_EINVAL;
    return fi_getname(&e->nics[nic].ep->fid, buf, len);
}

void atx_engine_stop(atx_engine *e) {
    __atomic_store_n(&e->stop, 1, __ATOMIC_SEQ_CST);
    wake_worker(e);
    /* every caller returns only once the worker is gone */
    pthread_mutex_lock(&e->join_lock);
    if (e->thread_started) {
        pthread_join(e->thread, NULL);
        e->thread_started = 0;
    }
    pthread_mutex_unlock(&e->join_lock);
}

void atx_engine_destroy(atx_engine *e) {
    if (!e) return;
    atx_engine_stop(e);   /* (the watch can still free a worker stuck in a post) */
    if (e->is_shm) watch_remove(e);   /* (not listed, if create failed: a no-op) */
    if (e->keytab) atx_keytab_close(e->keytab, 1);
    for (size_t i = 0; i < e->npeers; i++)
        if (e->peers[i].keytab) atx_keytab_close(e->peers[i].keytab, 0);
    while (e->regs) {   /* regions never deregistered: their MRs go before the domains */
        reg_close_mrs(e->regs);
        reg_unlink(e, e->regs);
    }
    pthread_mutex_lock(&g_lifecycle_lock);
    for (int i = 0; i < ATX_MAX_NICS; i++) close_nic(&e->nics[i]);
    pthread_mutex_unlock(&g_lifecycle_lock);
    for (size_t i = 0; i < e->rec_n; i++) free(e->recs[i].data);
    free(e->recs);
    free(e->batch);
    for (size_t i = 0; i < e->npeers; i++)
        for (int r = 0; r < e->peers[i].nremote; r++) free((void *)e->peers[i].names[r]);
    free(e->peers);
    free(e->dests);
    free(e->slots);
    if (e->ctab) {
        for (size_t i = 0; i < e->ctab_cap; i++) {
            atx_waiter *w = e->ctab[i].head;
            while (w) {
                atx_waiter *nx = w->next;
                free(w);
                w = nx;
            }
        }
        free(e->ctab);
    }
    if (e->wake_fd >= 0) close(e->wake_fd);
    if (e->notify_fd >= 0) close(e->notify_fd);
    pthread_mutex_destroy(&e->prog_lock);
    pthread_mutex_destroy(&e->rec_lock);
    pthread_mutex_destroy(&e->imm_lock);
    pthread_mutex_destroy(&e->join_lock);
    free(e);
}

void atx_engine_stats(atx_engine *e, int nic, atx_stats *out) {
    memset(out, 0, sizeof(*out));
    if (nic < 0 || nic >= e->nnics) return;
    /* without the progress lock: a provider stuck inside a call (shm, see
     * docs/providers.md) must not freeze a caller who only looks at
     * counters; a torn read of a counter is harmless */
    memcpy(out, &e->nics[nic].stats, sizeof(*out));
    out->inflight_bytes = e->nics[nic].inflight_bytes;
    out->weight = e->nics[nic].weight;
}
