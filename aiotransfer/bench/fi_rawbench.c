/*
 * fi_rawbench.c - raw libfabric reference benchmark for aiotransfer.
 *
 * One-sided RMA writes with remote CQ data (write_imm) over an FI_EP_RDM
 * endpoint, measured between two processes on the same host.  This is the
 * baseline the aiotransfer library is compared against, so it deliberately
 * does the minimum per operation: one fi_writemsg per write, one shared CQ
 * (FI_CQ_FORMAT_DATA, no wait object, busy polling), a fixed window of
 * writes in flight.
 *
 * Roles:  -r server   listens on 127.0.0.1 (TCP, out-of-band), prints
 *                     "PORT <n>" as its first stdout line, serves exactly one
 *                     client and exits.  All benchmark parameters come from
 *                     the client over the OOB socket.
 *         -r client   connects to the server, runs the benchmark and prints
 *                     one JSON line with the results.
 *
 * Modes:  bw      size bytes per write, window in flight, iters writes
 *         rate    same as bw (meant for small sizes), reported as Mop/s
 *         lat     ping-pong of size-byte (default 8) write_imm, one-way
 *                 latency = RTT/2 (median, p99)
 *         paged   pages (-N) pages of size bytes; each write moves one page
 *                 to the same page index on the target, page indices follow
 *                 random permutations (fixed seed), one immediate per page
 *         dcprobe diagnostic: the server stops progressing for a while; the
 *                 client measures when its write completes relative to the
 *                 moment the target starts progressing again (tells whether
 *                 the completion level requested really waits for the target)
 *
 * Metrics (n = measured writes, 1 GB/s = 1e9 B/s):
 *   gbps_recv/mops_recv  (n-1) writes over first..last measured arrival in the
 *                        target's CQ; "mops" is mops_recv.  Can over-report:
 *                        with tcp the target CQ may lag data placement and
 *                        then drain in a burst
 *   gbps_send/mops_send  n writes, client's first post .. last completion
 *   gbps_e2e/mops_e2e    n writes, client's first post .. target's last
 *                        arrival (same host, shared CLOCK_MONOTONIC)
 *   cpu_us_per_op_*      getrusage user+sys per op: client over its measured
 *                        phase, server over the e2e interval (1 ms samples)
 *   lat_us_*             RTT/2 of the measured round trips
 *
 * Defaults: FI_THREAD_DOMAIN (-t: FI_THREAD_SAFE), data progress
 * FI_PROGRESS_MANUAL requested (-g auto|unspec to change; the sockets
 * provider's default auto progress stalls on long streams).
 *
 * Exit codes: 0 ok, 1 verification failed, 2 usage, 3 timeout,
 *             4 libfabric error, 5 out-of-band (socket) error / peer error.
 *
 * Build: cc -O2 fi_rawbench.c -o fi_rawbench $(pkg-config --cflags --libs libfabric)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#define EXIT_VERIFY 1
#define EXIT_USAGE 2
#define EXIT_TIMEOUT 3
#define EXIT_FABRIC 4
#define EXIT_OOB 5

#define FIVER FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION)

enum mode { MODE_BW, MODE_RATE, MODE_LAT, MODE_PAGED, MODE_DCPROBE };
static const char *mode_names[] = {"bw", "rate", "lat", "paged", "dcprobe"};

#define CFG_DELIVERY 0x1u
#define CFG_INJECT 0x2u
#define CFG_THREAD_SAFE 0x4u
#define CFG_PROG_AUTO 0x8u   /* request FI_PROGRESS_AUTO data progress */
#define CFG_PROG_UNSPEC 0x10u /* leave data progress to the provider */

#ifndef CQ_BATCH
#define CQ_BATCH 64 /* completions per fi_cq_read */
#endif
#define IMM_PONG_BIT 0x80000000u
#define DCPROBE_SLEEP_MS 300
#define PAGE_SEED 0x5eed5eedULL
#define SALT_CLIENT 0xC11E47ULL
#define SALT_SERVER 0x5E77E7ULL

/* ------------------------------------------------------------------ */
/* configuration (sent client -> server)                               */

struct cfg {
	uint32_t mode;
	uint32_t flags;
	uint64_t size;
	uint64_t window;
	uint64_t iters;
	uint64_t warmup;
	uint64_t pages;		/* paged: pages in the region; bw/rate: slots (default 1) */
	char prov[64];
	char domain[64];
};

static const char *role = "?";
static int verbose;
static int timeout_s = 60;

static void die(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void die(int code, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "fi_rawbench[%s]: error: ", role);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

static void vlog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void vlog(const char *fmt, ...)
{
	va_list ap;
	if (!verbose)
		return;
	fprintf(stderr, "fi_rawbench[%s]: ", role);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

struct fab;
static struct fab *g_fab; /* for the timeout diagnostic */
static void alarm_report(void);

static void on_alarm(int sig)
{
	static const char msg[] = "fi_rawbench: error: timeout, giving up\n";
	(void)sig;
	if (write(2, msg, sizeof(msg) - 1) < 0) {
		/* nothing we can do */
	}
	alarm_report();
	_exit(EXIT_TIMEOUT);
}

/* async-signal-safe unsigned formatting */
static char *fmt_u64(char *p, uint64_t v)
{
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*p++ = tmp[--n];
	return p;
}

static inline double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_us(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
	       (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

/* ------------------------------------------------------------------ */
/* deterministic data pattern and page order                           */

static inline uint64_t mix64(uint64_t x)
{
	x += 0x9E3779B97F4A7C15ULL;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
	return x ^ (x >> 31);
}

/* byte at offset o of a pattern buffer = byte (o & 7) of mix64((o >> 3) ^ salt) */
static void fill_pattern(uint8_t *buf, size_t len, uint64_t salt)
{
	size_t i, nw = len / 8;
	for (i = 0; i < nw; i++) {
		uint64_t w = mix64(i ^ salt);
		memcpy(buf + 8 * i, &w, 8);
	}
	if (len % 8) {
		uint64_t w = mix64(nw ^ salt);
		memcpy(buf + 8 * nw, &w, len % 8);
	}
}

struct pager {
	uint32_t *perm;
	uint64_t n, pos;
	uint64_t rng;
};

static uint64_t rng_next(uint64_t *s)
{
	/* xorshift64* */
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static void pager_init(struct pager *p, uint64_t n)
{
	p->n = n ? n : 1;
	p->perm = malloc(p->n * sizeof(*p->perm));
	if (!p->perm)
		die(EXIT_USAGE, "out of memory");
	for (uint64_t i = 0; i < p->n; i++)
		p->perm[i] = (uint32_t)i;
	p->pos = p->n; /* forces a shuffle on first use */
	p->rng = PAGE_SEED;
}

static inline uint64_t pager_next(struct pager *p)
{
	if (p->pos == p->n) {
		for (uint64_t i = p->n - 1; i > 0; i--) {
			uint64_t j = rng_next(&p->rng) % (i + 1);
			uint32_t t = p->perm[i];
			p->perm[i] = p->perm[j];
			p->perm[j] = t;
		}
		p->pos = 0;
	}
	return p->perm[p->pos++];
}

/* Bytes of each side's region: paged and streaming modes write `pages`
 * slots of `size` bytes (the harness's layout: every write in flight has a
 * slot of its own), latency and the probe one. */
static uint64_t region_len(const struct cfg *c)
{
	int slotted = c->mode == MODE_PAGED || c->mode == MODE_BW || c->mode == MODE_RATE;
	return slotted ? c->size * (c->pages ? c->pages : 1) : c->size;
}

/* Streaming modes: write `seq` goes to slot (seq % window) % slots, the
 * aiotransfer side's Point.slot(). */
static inline uint64_t stream_slot(const struct cfg *c, uint64_t seq)
{
	uint64_t slots = c->pages ? c->pages : 1;
	return (seq % (c->window ? c->window : 1)) % slots;
}

/* ------------------------------------------------------------------ */
/* out-of-band socket protocol                                         */

#define OOB_MAGIC 0x52415742u /* "RAWB" */
enum { MSG_CFG = 1, MSG_HELLO, MSG_READY, MSG_DONE, MSG_RESULT, MSG_BYE };

struct msg_hdr {
	uint32_t magic;
	uint32_t type;
	uint32_t len;
};

struct hello {
	int32_t status; /* 0 ok, else exit code; err holds the reason */
	uint32_t addrlen;
	uint8_t addr[256];
	uint64_t mr_base; /* address to use for offset 0 of the MR */
	uint64_t mr_key;
	uint64_t mr_len;
	char prov[64];
	char err[256];
};

struct done {
	uint64_t sent;
	uint64_t sent_imm_sum;
	uint64_t recv;
	uint64_t recv_imm_sum;
	double t_complete;   /* dcprobe: monotonic time of the write completion */
	double t_first_post; /* monotonic time of the first measured post */
};

struct result {
	int32_t ok;
	uint32_t pad;
	uint64_t recv;
	uint64_t recv_imm_sum;
	uint64_t sent;
	uint64_t sent_imm_sum;
	uint64_t meas_recv;
	double recv_span_s;
	double gbps_recv;
	double mops_recv;
	double e2e_span_s; /* client's first measured post -> last measured arrival */
	double cpu_us_per_op;
	double t_progress_start; /* dcprobe: when the server started polling */
	double t_first_arrival;
	uint64_t rx_without_data;
	uint64_t unexpected;
	uint64_t first_rx_flags;
	uint64_t first_tx_flags;
	char err[256];
};

static void oob_write_all(int fd, const void *p, size_t len)
{
	const uint8_t *b = p;
	while (len) {
		ssize_t n = send(fd, b, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die(EXIT_OOB, "oob send: %s", n < 0 ? strerror(errno) : "closed");
		b += n;
		len -= (size_t)n;
	}
}

static void oob_read_all(int fd, void *p, size_t len)
{
	uint8_t *b = p;
	while (len) {
		ssize_t n = recv(fd, b, len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0)
			die(EXIT_OOB, "oob: peer closed the connection");
		if (n < 0)
			die(EXIT_OOB, "oob recv: %s", strerror(errno));
		b += n;
		len -= (size_t)n;
	}
}

static void oob_send(int fd, uint32_t type, const void *p, uint32_t len)
{
	struct msg_hdr h = {OOB_MAGIC, type, len};
	oob_write_all(fd, &h, sizeof(h));
	if (len)
		oob_write_all(fd, p, len);
}

static void oob_recv_body(int fd, uint32_t type, void *p, uint32_t len)
{
	struct msg_hdr h;
	oob_read_all(fd, &h, sizeof(h));
	if (h.magic != OOB_MAGIC || h.type != type || h.len != len)
		die(EXIT_OOB, "oob: unexpected message (type %u len %u, wanted type %u len %u)",
		    h.type, h.len, type, len);
	if (len)
		oob_read_all(fd, p, len);
}

static int oob_readable(int fd)
{
	struct pollfd pfd = {fd, POLLIN, 0};
	int r = poll(&pfd, 1, 0);
	return r > 0 && (pfd.revents & (POLLIN | POLLHUP | POLLERR));
}

/* ------------------------------------------------------------------ */
/* fabric state                                                        */

struct fab {
	struct fi_info *info;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_ep *ep;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_mr *mr_dst, *mr_src, *mr_rx;

	uint8_t *dst, *src, *rxbuf;
	size_t dst_len, src_len;
	void *src_desc, *rx_desc;
	uint64_t dst_base, dst_key;
	uint64_t mr_mode;

	fi_addr_t peer;
	uint64_t peer_base, peer_key, peer_len;

	/* FI_RX_CQ_DATA: receives that remote CQ data consumes */
	int rx_cq_data;
	size_t n_rx, n_rx_pending;
	struct fi_context2 *rx_ctx;
	uint32_t *rx_pending;

	/* tx context slots (also the window) */
	struct fi_context2 *tx_ctx;
	uint32_t *free_slots;
	size_t n_slots, n_free;
	uint64_t tx_flags;

	/* counters */
	uint64_t tx_posted, tx_done, tx_imm_sum;
	uint64_t rx_count, rx_imm_sum, rx_without_data, unexpected;
	uint64_t first_rx_flags, first_tx_flags;
	uint64_t rx_batches, rx_max_batch;
	double (*samples)[2]; /* server: (wall, cpu) samples, ~1 per ms */
	size_t n_samples, cap_samples;
	double *trace; /* verbose: time of each measured arrival (server) / completion (client) */
	uint64_t n_trace;
	double t_last_arrival;

	/* arrival measurement window: imm in [meas_lo, meas_hi) */
	uint32_t meas_lo, meas_hi;
	uint64_t meas_rx, meas_target;
	double t_first, t_last, cpu_last;
};

static void alarm_report(void)
{
	char buf[256], *p = buf;
	struct fab *f = g_fab;
	static const char a[] = "fi_rawbench: at timeout: role ", b[] = " tx_posted ", c[] = " tx_done ",
			  d[] = " rx_count ";
	if (!f)
		return;
	memcpy(p, a, sizeof(a) - 1), p += sizeof(a) - 1;
	memcpy(p, role, strlen(role)), p += strlen(role);
	memcpy(p, b, sizeof(b) - 1), p = fmt_u64(p + sizeof(b) - 1, f->tx_posted);
	memcpy(p, c, sizeof(c) - 1), p = fmt_u64(p + sizeof(c) - 1, f->tx_done);
	memcpy(p, d, sizeof(d) - 1), p = fmt_u64(p + sizeof(d) - 1, f->rx_count);
	*p++ = '\n';
	if (write(2, buf, (size_t)(p - buf)) < 0) {
	}
}

static void fi_die(int ret, const char *what) __attribute__((noreturn));
static void fi_die(int ret, const char *what)
{
	die(EXIT_FABRIC, "%s: %s (%d)", what, fi_strerror(ret < 0 ? -ret : ret), ret);
}

#define FICHK(call)                                                                   \
	do {                                                                          \
		int _r = (int)(call);                                                 \
		if (_r)                                                               \
			fi_die(_r, #call);                                            \
	} while (0)

static inline int is_ctx_in(const void *ctx, const struct fi_context2 *arr, size_t n)
{
	return arr && (const char *)ctx >= (const char *)arr &&
	       (const char *)ctx < (const char *)(arr + n);
}

static void post_rx(struct fab *f, size_t i)
{
	ssize_t r = fi_recv(f->ep, f->rxbuf + 64 * i, 64, f->rx_desc, FI_ADDR_UNSPEC, &f->rx_ctx[i]);
	if (r == -FI_EAGAIN) {
		f->rx_pending[f->n_rx_pending++] = (uint32_t)i; /* retried after the next CQ read */
		return;
	}
	if (r)
		fi_die((int)r, "fi_recv");
}

static void flush_rx_pending(struct fab *f)
{
	size_t n = f->n_rx_pending;
	f->n_rx_pending = 0;
	for (size_t k = 0; k < n; k++)
		post_rx(f, f->rx_pending[k]);
}

static void cq_error(struct fab *f)
{
	struct fi_cq_err_entry err;
	memset(&err, 0, sizeof(err));
	ssize_t r = fi_cq_readerr(f->cq, &err, 0);
	if (r < 0)
		fi_die((int)r, "fi_cq_readerr");
	die(EXIT_FABRIC, "completion error: %s (err %d, prov_errno %d: %s) flags 0x%" PRIx64,
	    fi_strerror(err.err), err.err, err.prov_errno,
	    fi_cq_strerror(f->cq, err.prov_errno, err.err_data, NULL, 0), err.flags);
}

/* Read and account completions.  Returns the number of entries handled. */
static ssize_t progress(struct fab *f)
{
	struct fi_cq_data_entry e[CQ_BATCH];
	ssize_t n = fi_cq_read(f->cq, e, CQ_BATCH);
	if (n == -FI_EAGAIN)
		return 0;
	if (n == -FI_EAVAIL)
		cq_error(f);
	if (n < 0)
		fi_die((int)n, "fi_cq_read");
	double t = 0;
	uint64_t rx0 = f->rx_count;
	for (ssize_t i = 0; i < n; i++) {
		void *ctx = e[i].op_context;
		uint64_t fl = e[i].flags;
		if (is_ctx_in(ctx, f->tx_ctx, f->n_slots)) {
			/* our own write completed (sockets also sets FI_REMOTE_CQ_DATA
			 * here, so classify by context, never by that flag) */
			f->free_slots[f->n_free++] = (uint32_t)((struct fi_context2 *)ctx - f->tx_ctx);
			if (!f->tx_done)
				f->first_tx_flags = fl;
			f->tx_done++;
		} else if ((fl & FI_REMOTE_WRITE) ||
			   (is_ctx_in(ctx, f->rx_ctx, f->n_rx) && (fl & FI_REMOTE_CQ_DATA))) {
			uint32_t imm = (uint32_t)e[i].data;
			if (!t)
				t = now_s();
			if (!f->rx_count)
				f->first_rx_flags = fl;
			if (!(fl & FI_REMOTE_CQ_DATA))
				f->rx_without_data++;
			f->rx_count++;
			f->rx_imm_sum += imm;
			f->t_last_arrival = t;
			if (imm >= f->meas_lo && imm < f->meas_hi) {
				if (!f->meas_rx)
					f->t_first = t;
				if (f->trace && f->n_trace < f->meas_target)
					f->trace[f->n_trace++] = t;
				f->meas_rx++;
				f->t_last = t;
				if (f->meas_rx == f->meas_target)
					f->cpu_last = cpu_us();
			}
			if (is_ctx_in(ctx, f->rx_ctx, f->n_rx))
				post_rx(f, (size_t)((struct fi_context2 *)ctx - f->rx_ctx));
		} else {
			if (!f->unexpected)
				vlog("unexpected completion flags 0x%" PRIx64 " ctx %p", fl, ctx);
			f->unexpected++;
			if (is_ctx_in(ctx, f->rx_ctx, f->n_rx))
				post_rx(f, (size_t)((struct fi_context2 *)ctx - f->rx_ctx));
		}
	}
	if (f->n_rx_pending)
		flush_rx_pending(f);
	if (f->rx_count != rx0) {
		f->rx_batches++;
		if (f->rx_count - rx0 > f->rx_max_batch)
			f->rx_max_batch = f->rx_count - rx0;
	}
	return n;
}

/* Post one write of len bytes from src+src_off to peer MR offset dst_off. */
static inline ssize_t post_write(struct fab *f, uint64_t src_off, uint64_t dst_off, size_t len,
				 uint32_t imm)
{
	if (!f->n_free)
		return -FI_EAGAIN;
	uint32_t slot = f->free_slots[--f->n_free];
	struct iovec iov = {f->src + src_off, len};
	void *desc = f->src_desc;
	struct fi_rma_iov rma = {f->peer_base + dst_off, len, f->peer_key};
	struct fi_msg_rma msg = {
	    .msg_iov = &iov,
	    .desc = &desc,
	    .iov_count = 1,
	    .addr = f->peer,
	    .rma_iov = &rma,
	    .rma_iov_count = 1,
	    .context = &f->tx_ctx[slot],
	    .data = imm,
	};
	ssize_t r = fi_writemsg(f->ep, &msg, f->tx_flags);
	if (r) {
		f->free_slots[f->n_free++] = slot;
		return r;
	}
	f->tx_posted++;
	f->tx_imm_sum += imm;
	return 0;
}

static void post_write_retry(struct fab *f, uint64_t src_off, uint64_t dst_off, size_t len,
			     uint32_t imm)
{
	ssize_t r;
	while ((r = post_write(f, src_off, dst_off, len, imm)) == -FI_EAGAIN)
		progress(f);
	if (r)
		fi_die((int)r, "fi_writemsg");
}

static int is_ip_format(uint32_t fmt)
{
	return fmt == FI_SOCKADDR || fmt == FI_SOCKADDR_IN || fmt == FI_SOCKADDR_IN6;
}

/* Refuse anything that is an IP address but not IPv4 loopback. */
static void check_loopback(uint32_t fmt, const void *addr, size_t len, const char *what)
{
	if (!is_ip_format(fmt))
		return;
	const struct sockaddr *sa = addr;
	if (len < sizeof(struct sockaddr_in) || sa->sa_family != AF_INET)
		die(EXIT_FABRIC, "%s is not an IPv4 address; refusing (loopback only)", what);
	const struct sockaddr_in *sin = addr;
	if ((ntohl(sin->sin_addr.s_addr) >> 24) != 127)
		die(EXIT_FABRIC, "%s %s is not a loopback address; refusing", what,
		    inet_ntoa(sin->sin_addr));
}

static const char *mr_mode_str(uint64_t m, char *buf, size_t n)
{
	static const struct {
		uint64_t bit;
		const char *name;
	} bits[] = {{FI_MR_LOCAL, "FI_MR_LOCAL"},       {FI_MR_VIRT_ADDR, "FI_MR_VIRT_ADDR"},
		    {FI_MR_ALLOCATED, "FI_MR_ALLOCATED"}, {FI_MR_PROV_KEY, "FI_MR_PROV_KEY"},
		    {FI_MR_ENDPOINT, "FI_MR_ENDPOINT"},   {FI_MR_RAW, "FI_MR_RAW"},
		    {FI_MR_RMA_EVENT, "FI_MR_RMA_EVENT"}, {FI_MR_MMU_NOTIFY, "FI_MR_MMU_NOTIFY"},
		    {FI_MR_HMEM, "FI_MR_HMEM"}};
	buf[0] = 0;
	for (size_t i = 0; i < sizeof(bits) / sizeof(bits[0]); i++)
		if (m & bits[i].bit) {
			if (buf[0])
				strncat(buf, "|", n - strlen(buf) - 1);
			strncat(buf, bits[i].name, n - strlen(buf) - 1);
		}
	return buf;
}

/* Buffers as the aiotransfer side gets them from aiotransfer.alloc(): from
 * 2 MiB up, 2 MiB-aligned and advised for transparent huge pages
 * (madvise(MADV_HUGEPAGE); THP is "madvise" on Debian), which makes the shm
 * provider's process_vm_readv pin 2 MiB pages instead of 4 KiB ones.  Same
 * memory, same pages on both sides. */
#define HUGE_PAGE (2u << 20)
static void *alloc_buf(size_t len)
{
	void *p = NULL;
	size_t align = len >= HUGE_PAGE ? HUGE_PAGE : 4096;
	if (len < 64)
		len = 64;
	len = (len + align - 1) & ~(align - 1);
	if (posix_memalign(&p, align, len))
		die(EXIT_USAGE, "cannot allocate %zu bytes", len);
#ifdef MADV_HUGEPAGE
	if (align == HUGE_PAGE)
		madvise(p, len, MADV_HUGEPAGE);
#endif
	memset(p, 0, len); /* fault the pages in (and satisfies FI_MR_ALLOCATED) */
	return p;
}

static struct fid_mr *reg_mr(struct fab *f, void *buf, size_t len, uint64_t access,
			     uint64_t req_key)
{
	struct fid_mr *mr;
	if (len < 64)
		len = 64;
	FICHK(fi_mr_reg(f->domain, buf, len, access, 0, req_key, 0, &mr, NULL));
	if (f->mr_mode & FI_MR_ENDPOINT) {
		FICHK(fi_mr_bind(mr, &f->ep->fid, 0));
		FICHK(fi_mr_enable(mr));
	}
	return mr;
}

/*
 * fi_getinfo: IP providers are pinned to IPv4 loopback (node 127.0.0.1 as
 * source, domain "lo" unless given); other providers (shm) are used as-is
 * but are refused if they would hand back an IP address.
 */
static struct fi_info *get_info(const struct cfg *c, char *err, size_t errlen)
{
	struct fi_info *hints = fi_allocinfo(), *h, *info = NULL;
	int ret;
	if (!hints)
		die(EXIT_FABRIC, "fi_allocinfo failed");
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_MSG | FI_SEND | FI_RECV;
	hints->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA;
	hints->domain_attr->mr_mode =
	    FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
	hints->domain_attr->threading =
	    (c->flags & CFG_THREAD_SAFE) ? FI_THREAD_SAFE : FI_THREAD_DOMAIN;
	hints->domain_attr->cq_data_size = 4;
	if (c->flags & CFG_PROG_AUTO)
		hints->domain_attr->data_progress = FI_PROGRESS_AUTO;
	else if (!(c->flags & CFG_PROG_UNSPEC))
		hints->domain_attr->data_progress = FI_PROGRESS_MANUAL;
	hints->fabric_attr->prov_name = strdup(c->prov);
	if (c->domain[0])
		hints->domain_attr->name = strdup(c->domain);

	h = fi_dupinfo(hints);
	h->addr_format = FI_SOCKADDR_IN;
	if (!c->domain[0])
		h->domain_attr->name = strdup("lo");
	ret = fi_getinfo(FIVER, "127.0.0.1", NULL, FI_SOURCE, h, &info);
	fi_freeinfo(h);
	if (ret == -FI_ENODATA) {
		info = NULL;
		ret = fi_getinfo(FIVER, NULL, NULL, 0, hints, &info);
		if (!ret && is_ip_format(info->addr_format)) {
			snprintf(err, errlen,
				 "provider %s/domain %s only offers non-loopback IP addresses",
				 c->prov, c->domain[0] ? c->domain : "(any)");
			fi_freeinfo(info);
			fi_freeinfo(hints);
			return NULL;
		}
	}
	fi_freeinfo(hints);
	if (ret) {
		snprintf(err, errlen, "fi_getinfo(prov=%s, domain=%s): %s (%d)", c->prov,
			 c->domain[0] ? c->domain : "(default)", fi_strerror(-ret), ret);
		return NULL;
	}
	return info;
}

/* Build everything up to (and including) the registered buffers. */
static int fab_setup(struct fab *f, const struct cfg *c, int is_server, char *err, size_t errlen)
{
	struct fi_info *info = get_info(c, err, errlen);
	if (!info)
		return EXIT_FABRIC;
	f->info = info;
	if (verbose)
		fprintf(stderr, "fi_rawbench[%s]: selected fi_info:\n%s", role,
			fi_tostr(info, FI_TYPE_INFO));
	if (info->src_addr)
		check_loopback(info->addr_format, info->src_addr, info->src_addrlen, "source address");
	if (info->domain_attr->cq_data_size < 4) {
		snprintf(err, errlen, "provider cq_data_size %zu < 4", info->domain_attr->cq_data_size);
		return EXIT_FABRIC;
	}
	f->mr_mode = info->domain_attr->mr_mode;
	f->rx_cq_data = !!(info->mode & FI_RX_CQ_DATA);

	FICHK(fi_fabric(info->fabric_attr, &f->fabric, NULL));
	FICHK(fi_domain(f->fabric, info, &f->domain, NULL));

	struct fi_cq_attr cqa;
	memset(&cqa, 0, sizeof(cqa));
	cqa.format = FI_CQ_FORMAT_DATA;
	cqa.wait_obj = FI_WAIT_NONE;
	cqa.size = c->window * 4 < 4096 ? 4096 : c->window * 4;
	FICHK(fi_cq_open(f->domain, &cqa, &f->cq, NULL));

	struct fi_av_attr ava;
	memset(&ava, 0, sizeof(ava));
	ava.type = FI_AV_TABLE;
	ava.count = 4;
	FICHK(fi_av_open(f->domain, &ava, &f->av, NULL));

	FICHK(fi_endpoint(f->domain, info, &f->ep, NULL));
	FICHK(fi_ep_bind(f->ep, &f->av->fid, 0));
	FICHK(fi_ep_bind(f->ep, &f->cq->fid, FI_TRANSMIT | FI_RECV));
	FICHK(fi_enable(f->ep));

	/* buffers: dst = remotely written region, src = local source of writes */
	size_t region = region_len(c);
	int client = !is_server;
	int lat = c->mode == MODE_LAT;
	f->dst_len = (client && !lat) ? 64 : region;
	f->src_len = (is_server && !lat) ? 64 : region;
	f->dst = alloc_buf(f->dst_len);
	f->src = alloc_buf(f->src_len);
	fill_pattern(f->src, f->src_len, is_server ? SALT_SERVER : SALT_CLIENT);

	uint64_t key_base = is_server ? 0x100 : 0x200;
	f->mr_dst = reg_mr(f, f->dst, f->dst_len, FI_REMOTE_WRITE, key_base + 1);
	f->mr_src = reg_mr(f, f->src, f->src_len, FI_WRITE, key_base + 2);
	f->src_desc = fi_mr_desc(f->mr_src);
	f->dst_key = fi_mr_key(f->mr_dst);
	if (f->dst_key == FI_KEY_NOTAVAIL) {
		snprintf(err, errlen, "provider needs FI_MR_RAW keys (not supported here)");
		return EXIT_FABRIC;
	}
	f->dst_base = (f->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)f->dst : 0;

	/* transmit slots = window */
	f->n_slots = c->window ? c->window : 1;
	if (is_server && f->n_slots < 4)
		f->n_slots = 4;
	f->tx_ctx = calloc(f->n_slots, sizeof(*f->tx_ctx));
	f->free_slots = calloc(f->n_slots, sizeof(*f->free_slots));
	if (!f->tx_ctx || !f->free_slots)
		die(EXIT_USAGE, "out of memory");
	for (size_t i = 0; i < f->n_slots; i++)
		f->free_slots[i] = (uint32_t)(f->n_slots - 1 - i);
	f->n_free = f->n_slots;
	f->tx_flags = FI_REMOTE_CQ_DATA | FI_COMPLETION;
	if (c->flags & CFG_DELIVERY)
		f->tx_flags |= FI_DELIVERY_COMPLETE;
	if ((c->flags & CFG_INJECT) && c->size <= info->tx_attr->inject_size)
		f->tx_flags |= FI_INJECT;

	/* FI_RX_CQ_DATA: every incoming write_imm consumes a posted receive */
	if (f->rx_cq_data) {
		f->n_rx = info->rx_attr->size ? info->rx_attr->size : 256;
		if (f->n_rx > 1024)
			f->n_rx = 1024;
		f->rx_ctx = calloc(f->n_rx, sizeof(*f->rx_ctx));
		f->rx_pending = calloc(f->n_rx, sizeof(*f->rx_pending));
		f->rxbuf = alloc_buf(64 * f->n_rx);
		f->mr_rx = reg_mr(f, f->rxbuf, 64 * f->n_rx, FI_RECV, key_base + 3);
		f->rx_desc = fi_mr_desc(f->mr_rx);
		for (size_t i = 0; i < f->n_rx; i++)
			post_rx(f, i);
		if (f->n_rx_pending)
			die(EXIT_FABRIC, "could not pre-post %zu receives", f->n_rx);
	}
	char mm[256];
	vlog("mr_mode=%s mode=0x%" PRIx64 " rx_cq_data=%d inject_size=%zu tx_size=%zu rx_size=%zu "
	     "tx_flags=0x%" PRIx64,
	     mr_mode_str(f->mr_mode, mm, sizeof(mm)), info->mode, f->rx_cq_data,
	     info->tx_attr->inject_size, info->tx_attr->size, info->rx_attr->size, f->tx_flags);
	return 0;
}

static void fab_close_one(struct fid *fid, const char *what)
{
	if (!fid)
		return;
	int r = fi_close(fid);
	if (r)
		fprintf(stderr, "fi_rawbench[%s]: warning: fi_close(%s): %s\n", role, what,
			fi_strerror(-r));
}

static void fab_teardown(struct fab *f)
{
	fab_close_one(f->mr_rx ? &f->mr_rx->fid : NULL, "mr_rx");
	fab_close_one(f->mr_src ? &f->mr_src->fid : NULL, "mr_src");
	fab_close_one(f->mr_dst ? &f->mr_dst->fid : NULL, "mr_dst");
	fab_close_one(f->ep ? &f->ep->fid : NULL, "ep");
	fab_close_one(f->av ? &f->av->fid : NULL, "av");
	fab_close_one(f->cq ? &f->cq->fid : NULL, "cq");
	fab_close_one(f->domain ? &f->domain->fid : NULL, "domain");
	fab_close_one(f->fabric ? &f->fabric->fid : NULL, "fabric");
	if (f->info)
		fi_freeinfo(f->info);
	free(f->dst);
	free(f->src);
	free(f->rxbuf);
	free(f->tx_ctx);
	free(f->free_slots);
	free(f->rx_ctx);
	free(f->rx_pending);
	free(f->samples);
	free(f->trace);
	g_fab = NULL;
	memset(f, 0, sizeof(*f));
}

static void fill_hello(struct fab *f, struct hello *h)
{
	size_t len = sizeof(h->addr);
	memset(h, 0, sizeof(*h));
	int r = fi_getname(&f->ep->fid, h->addr, &len);
	if (r)
		fi_die(r, "fi_getname");
	check_loopback(f->info->addr_format, h->addr, len, "endpoint address");
	h->addrlen = (uint32_t)len;
	h->mr_base = f->dst_base;
	h->mr_key = f->dst_key;
	h->mr_len = f->dst_len;
	snprintf(h->prov, sizeof(h->prov), "%s", f->info->fabric_attr->prov_name);
}

static void use_peer(struct fab *f, const struct hello *h)
{
	check_loopback(f->info->addr_format, h->addr, h->addrlen, "peer address");
	int r = fi_av_insert(f->av, h->addr, 1, &f->peer, 0, NULL);
	if (r != 1)
		fi_die(r < 0 ? r : -FI_EOTHER, "fi_av_insert");
	f->peer_base = h->mr_base;
	f->peer_key = h->mr_key;
	f->peer_len = h->mr_len;
	if (verbose) {
		char s[128];
		size_t sl = sizeof(s);
		fi_av_straddr(f->av, h->addr, s, &sl);
		vlog("peer %s mr base 0x%" PRIx64 " key 0x%" PRIx64 " len %" PRIu64, s, h->mr_base,
		     h->mr_key, h->mr_len);
	}
}

/* Wait for an OOB message while keeping the fabric progressing. */
static void oob_recv_progress(int fd, uint32_t type, void *p, uint32_t len, struct fab *f)
{
	while (!oob_readable(fd)) {
		if (f) {
			for (int i = 0; i < 64; i++)
				progress(f);
		} else {
			struct pollfd pfd = {fd, POLLIN, 0};
			poll(&pfd, 1, -1);
		}
	}
	oob_recv_body(fd, type, p, len);
}

static void print_trace(const char *what, const double *tr, uint64_t n)
{
	if (!verbose || !n)
		return;
	fprintf(stderr, "fi_rawbench[%s]: %s timeline (monotonic s):", role, what);
	static const double q[] = {0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1};
	for (size_t i = 0; i < sizeof(q) / sizeof(q[0]); i++) {
		uint64_t k = (uint64_t)(q[i] * (double)(n - 1));
		fprintf(stderr, " %g%%=%.6f", q[i] * 100, tr[k]);
	}
	fputc('\n', stderr);
}

/* ------------------------------------------------------------------ */
/* server                                                              */

static uint64_t default_warmup(const struct cfg *c)
{
	uint64_t w = c->iters / 10;
	uint64_t floor = c->mode == MODE_LAT ? 10 : 16;
	if (c->mode == MODE_DCPROBE)
		return 1;
	return w < floor ? floor : w;
}

static void cpu_sample(struct fab *f, double t)
{
	if (f->n_samples == f->cap_samples) {
		size_t cap = f->cap_samples ? 2 * f->cap_samples : 4096;
		void *p = realloc(f->samples, cap * sizeof(*f->samples));
		if (!p)
			return;
		f->samples = p;
		f->cap_samples = cap;
	}
	f->samples[f->n_samples][0] = t;
	f->samples[f->n_samples][1] = cpu_us();
	f->n_samples++;
}

/* this process's CPU time (us) at wall time t, interpolated from the samples */
static double cpu_at(const struct fab *f, double t)
{
	size_t n = f->n_samples;
	if (!n)
		return 0;
	if (t <= f->samples[0][0])
		return f->samples[0][1];
	for (size_t i = 1; i < n; i++)
		if (f->samples[i][0] >= t) {
			double t0 = f->samples[i - 1][0], t1 = f->samples[i][0];
			double c0 = f->samples[i - 1][1], c1 = f->samples[i][1];
			return t1 > t0 ? c0 + (c1 - c0) * (t - t0) / (t1 - t0) : c1;
		}
	return f->samples[n - 1][1];
}

static int run_server(int port)
{
	int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in sa;
	socklen_t sl = sizeof(sa);
	if (lfd < 0)
		die(EXIT_OOB, "socket: %s", strerror(errno));
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 1))
		die(EXIT_OOB, "bind/listen 127.0.0.1:%d: %s", port, strerror(errno));
	getsockname(lfd, (struct sockaddr *)&sa, &sl);
	printf("PORT %d\n", ntohs(sa.sin_port));
	fflush(stdout);

	int fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		die(EXIT_OOB, "accept: %s", strerror(errno));
	close(lfd);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

	struct cfg c;
	oob_recv_body(fd, MSG_CFG, &c, sizeof(c));
	c.prov[sizeof(c.prov) - 1] = 0;
	c.domain[sizeof(c.domain) - 1] = 0;

	struct fab F, *f = &F;
	struct hello h, peer;
	memset(f, 0, sizeof(*f));
	g_fab = f;
	char err[256] = "";
	int rc = fab_setup(f, &c, 1, err, sizeof(err));
	if (rc) {
		memset(&h, 0, sizeof(h));
		h.status = rc;
		snprintf(h.err, sizeof(h.err), "server: %s", err);
		oob_send(fd, MSG_HELLO, &h, sizeof(h));
		die(rc, "%s", err);
	}
	fill_hello(f, &h);
	oob_send(fd, MSG_HELLO, &h, sizeof(h));
	oob_recv_body(fd, MSG_HELLO, &peer, sizeof(peer));
	if (peer.status)
		die(EXIT_OOB, "client failed: %s", peer.err);
	use_peer(f, &peer);

	uint64_t expected = c.warmup + c.iters;
	f->meas_lo = (uint32_t)c.warmup;
	f->meas_hi = (uint32_t)(c.warmup + c.iters);
	f->meas_target = c.iters;
	if (verbose)
		f->trace = calloc(c.iters + 1, sizeof(double));

	oob_send(fd, MSG_READY, NULL, 0);
	double t_progress_start = now_s();
	cpu_sample(f, t_progress_start);
	if (c.mode == MODE_DCPROBE) {
		/* take the warm-up write (connection setup), then deliberately stop
		 * progressing: a completion the client sees while we sleep did not
		 * wait for us (fine with auto progress, not delivery-complete with
		 * manual progress) */
		while (f->rx_count < c.warmup)
			progress(f);
		usleep(DCPROBE_SLEEP_MS * 1000);
		t_progress_start = now_s();
	}

	struct done d;
	int got_done = 0;
	uint64_t spins = 0, pongs = 0;
	double t_check = now_s();
	int lat = c.mode == MODE_LAT;
	while (f->rx_count < expected || (lat && f->tx_done < pongs)) {
		progress(f);
		if (lat) {
			while (pongs < f->rx_count) {
				ssize_t r = post_write(f, 0, 0, c.size, (uint32_t)pongs | IMM_PONG_BIT);
				if (r == -FI_EAGAIN)
					break;
				if (r)
					fi_die((int)r, "fi_writemsg (pong)");
				pongs++;
			}
		}
		/* cheap, rate-limited: CPU-time samples (1/ms) and a check whether
		 * the client gave up / is done (every 20 ms) */
		if ((++spins & 255) == 0) {
			double t = now_s();
			if (t - f->samples[f->n_samples - 1][0] >= 0.001)
				cpu_sample(f, t);
			if (t - t_check > 0.02) {
				t_check = t;
				if (oob_readable(fd)) {
					oob_recv_body(fd, MSG_DONE, &d, sizeof(d));
					got_done = 1;
					break;
				}
			}
		}
	}
	if (!got_done)
		oob_recv_progress(fd, MSG_DONE, &d, sizeof(d), f);
	/* the client may claim more writes than we have seen so far: give them
	 * a grace period to show up before declaring a mismatch */
	double grace_until = now_s() + 2.0;
	while (f->rx_count < d.sent && now_s() < grace_until)
		progress(f);

	struct result res;
	memset(&res, 0, sizeof(res));
	res.recv = f->rx_count;
	res.recv_imm_sum = f->rx_imm_sum;
	res.sent = f->tx_posted;
	res.sent_imm_sum = f->tx_imm_sum;
	res.meas_recv = f->meas_rx;
	res.rx_without_data = f->rx_without_data;
	res.unexpected = f->unexpected;
	res.first_rx_flags = f->first_rx_flags;
	res.first_tx_flags = f->first_tx_flags;
	res.t_progress_start = t_progress_start;
	res.t_first_arrival = f->t_first;
	if (f->meas_rx >= 2 && f->t_last > f->t_first) {
		double span = f->t_last - f->t_first;
		res.recv_span_s = span;
		/* n arrivals bound n-1 complete writes in [first, last] */
		res.gbps_recv = (double)(f->meas_rx - 1) * (double)c.size / span / 1e9;
		res.mops_recv = (double)(f->meas_rx - 1) / span / 1e6;
	}
	if (f->meas_rx != f->meas_target)
		f->cpu_last = cpu_us();
	if (f->meas_rx && d.t_first_post > 0 && f->t_last > d.t_first_post) {
		/* same host, same CLOCK_MONOTONIC: the client's first measured post
		 * to our last measured arrival; server CPU over that same interval */
		res.e2e_span_s = f->t_last - d.t_first_post;
		res.cpu_us_per_op = (f->cpu_last - cpu_at(f, d.t_first_post)) / (double)f->meas_rx;
	}

	/* verification */
	int ok = 1;
	char *e = res.err;
	size_t el = sizeof(res.err);
	if (f->rx_count != d.sent || f->rx_imm_sum != d.sent_imm_sum) {
		ok = 0;
		snprintf(e, el, "immediates: received %" PRIu64 " (sum %" PRIu64 "), client sent %" PRIu64
				" (sum %" PRIu64 ")",
			 f->rx_count, f->rx_imm_sum, d.sent, d.sent_imm_sum);
	} else if (f->rx_count != expected) {
		ok = 0;
		snprintf(e, el, "received %" PRIu64 " writes, expected %" PRIu64, f->rx_count, expected);
	} else if (f->rx_without_data || f->unexpected) {
		ok = 0;
		snprintf(e, el, "%" PRIu64 " arrivals without FI_REMOTE_CQ_DATA, %" PRIu64
				" unexpected completions",
			 f->rx_without_data, f->unexpected);
	} else if (c.size && expected) {
		size_t region = f->dst_len;
		uint8_t *ref = malloc(region);
		if (!ref)
			die(EXIT_USAGE, "out of memory");
		fill_pattern(ref, region, SALT_CLIENT);
		if (c.mode == MODE_PAGED || c.mode == MODE_BW || c.mode == MODE_RATE) {
			/* replay the page (slot) order to know which were written */
			uint64_t n = c.pages ? c.pages : 1;
			uint8_t *touched = calloc(n, 1);
			if (!touched)
				die(EXIT_USAGE, "out of memory");
			if (c.mode == MODE_PAGED) {
				struct pager pg;
				pager_init(&pg, n);
				/* the page sequence is a chain of permutations, so the
				 * first `pages` writes touch every page */
				if (expected >= n)
					memset(touched, 1, n);
				else
					for (uint64_t k = 0; k < expected; k++)
						touched[pager_next(&pg)] = 1;
				free(pg.perm);
			} else {
				/* write i went to slot (i % window) % slots: the
				 * first min(writes, window, slots) slots, stated
				 * here apart from stream_slot() so a client that
				 * strays from the rule fails */
				uint64_t m = expected < c.window ? expected : c.window;
				memset(touched, 1, m < n ? m : n);
			}
			for (uint64_t p = 0; p < n && ok; p++) {
				uint8_t *a = f->dst + p * c.size, *b = ref + p * c.size;
				if (touched[p] ? memcmp(a, b, c.size) != 0 : a[0] != 0) {
					ok = 0;
					snprintf(e, el, "data mismatch in %s %" PRIu64,
						 c.mode == MODE_PAGED ? "page" : "slot", p);
				}
			}
			free(touched);
		} else if (memcmp(f->dst, ref, c.size) != 0) {
			size_t o = 0;
			while (o < c.size && f->dst[o] == ref[o])
				o++;
			ok = 0;
			snprintf(e, el, "data mismatch at offset %zu of %" PRIu64, o, c.size);
		}
		free(ref);
	}
	res.ok = ok;
	vlog("arrivals: first measured %.6f last %.6f (monotonic s), measured %" PRIu64 ", cq reads "
	     "with arrivals %" PRIu64 ", max arrivals per read %" PRIu64,
	     f->t_first, f->t_last, f->meas_rx, f->rx_batches, f->rx_max_batch);
	print_trace("arrival", f->trace, f->n_trace);
	free(f->trace);
	f->trace = NULL;
	oob_send(fd, MSG_RESULT, &res, sizeof(res));
	oob_recv_progress(fd, MSG_BYE, NULL, 0, f);
	fab_teardown(f);
	close(fd);
	if (!ok) {
		fprintf(stderr, "fi_rawbench[server]: VERIFY FAILED: %s\n", res.err);
		return EXIT_VERIFY;
	}
	vlog("verified ok: %" PRIu64 " writes", f->rx_count);
	return 0;
}

/* ------------------------------------------------------------------ */
/* client                                                              */

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Post `count` writes numbered seq0.. with at most n_slots in flight; wait for all. */
static void stream(struct fab *f, const struct cfg *c, struct pager *pg, uint64_t seq0,
		   uint64_t count, double *t_last_completion)
{
	uint64_t posted = 0, done0 = f->tx_done;
	size_t len = c->size;
	while (f->tx_done - done0 < count) {
		while (posted < count && f->n_free) {
			uint64_t off = (pg ? pager_next(pg) : stream_slot(c, seq0 + posted)) * c->size;
			ssize_t r = post_write(f, off, off, len, (uint32_t)(seq0 + posted));
			if (r == -FI_EAGAIN) {
				if (pg)
					pg->pos--; /* retry the same page */
				break;
			}
			if (r)
				fi_die((int)r, "fi_writemsg");
			posted++;
		}
		uint64_t d0 = f->tx_done;
		if (progress(f) > 0 && t_last_completion) {
			double t = now_s();
			*t_last_completion = t;
			if (f->trace)
				for (; d0 < f->tx_done && f->n_trace < count; d0++)
					f->trace[f->n_trace++] = t;
		}
	}
}

static void json_num(const char *k, double v, int valid)
{
	if (valid)
		printf(", \"%s\": %.6g", k, v);
	else
		printf(", \"%s\": null", k);
}

static void json_str(const char *k, const char *v)
{
	printf(", \"%s\": \"", k);
	for (; v && *v; v++) {
		if (*v == '"' || *v == '\\')
			putchar('\\');
		if ((unsigned char)*v < 0x20)
			putchar(' ');
		else
			putchar(*v);
	}
	putchar('"');
}

static int run_client(struct cfg *c, int port)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in sa;
	if (fd < 0)
		die(EXIT_OOB, "socket: %s", strerror(errno));
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		die(EXIT_OOB, "connect 127.0.0.1:%d: %s", port, strerror(errno));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	oob_send(fd, MSG_CFG, c, sizeof(*c));

	struct fab F, *f = &F;
	struct hello h, peer;
	memset(f, 0, sizeof(*f));
	g_fab = f;
	oob_recv_body(fd, MSG_HELLO, &peer, sizeof(peer));
	if (peer.status)
		die(peer.status, "%s", peer.err);
	char err[256] = "";
	int rc = fab_setup(f, c, 0, err, sizeof(err));
	if (rc) {
		memset(&h, 0, sizeof(h));
		h.status = rc;
		snprintf(h.err, sizeof(h.err), "client: %s", err);
		oob_send(fd, MSG_HELLO, &h, sizeof(h));
		die(rc, "%s", err);
	}
	fill_hello(f, &h);
	oob_send(fd, MSG_HELLO, &h, sizeof(h));
	use_peer(f, &peer);
	uint64_t region = region_len(c);
	if (peer.mr_len < region)
		die(EXIT_OOB, "server region too small (%" PRIu64 " < %" PRIu64 ")", peer.mr_len, region);
	oob_recv_body(fd, MSG_READY, NULL, 0);

	/* pongs (lat) are counted in their own imm range */
	f->meas_lo = (uint32_t)c->warmup | IMM_PONG_BIT;
	f->meas_hi = (uint32_t)(c->warmup + c->iters) | IMM_PONG_BIT;
	f->meas_target = c->iters;

	double t0 = 0, t1 = 0, cpu0 = 0, cpu1 = 0, t_complete = 0;
	double *rtt = NULL;
	struct pager pg, *pgp = NULL;
	if (c->mode == MODE_PAGED) {
		pager_init(&pg, c->pages);
		pgp = &pg;
	}

	if (c->mode == MODE_LAT) {
		rtt = calloc(c->iters ? c->iters : 1, sizeof(double));
		uint64_t total = c->warmup + c->iters;
		for (uint64_t i = 0; i < total; i++) {
			if (i == c->warmup)
				cpu0 = cpu_us();
			uint64_t want_rx = f->rx_count + 1, want_tx = f->tx_done + 1;
			double ts = now_s();
			if (i == c->warmup)
				t0 = ts;
			post_write_retry(f, 0, 0, c->size, (uint32_t)i);
			while (f->rx_count < want_rx)
				progress(f);
			double te = f->t_last_arrival;
			while (f->tx_done < want_tx)
				progress(f);
			if (i >= c->warmup)
				rtt[i - c->warmup] = te - ts;
		}
		cpu1 = cpu_us();
	} else if (c->mode == MODE_DCPROBE) {
		stream(f, c, NULL, 0, c->warmup, NULL);
		double tw = now_s() + 0.05; /* let the server see it and fall asleep */
		while (now_s() < tw)
			progress(f);
		uint64_t want_tx = f->tx_done + 1;
		t0 = now_s();
		post_write_retry(f, 0, 0, c->size, (uint32_t)c->warmup);
		while (f->tx_done < want_tx)
			progress(f);
		t_complete = now_s();
		t1 = t_complete;
	} else {
		if (c->warmup)
			stream(f, c, pgp, 0, c->warmup, NULL);
		cpu0 = cpu_us();
		t0 = now_s();
		t1 = t0;
		if (verbose)
			f->trace = calloc(c->iters + 1, sizeof(double));
		stream(f, c, pgp, c->warmup, c->iters, &t1);
		cpu1 = cpu_us();
		print_trace("completion", f->trace, f->n_trace);
		free(f->trace);
		f->trace = NULL;
		vlog("measured phase: first post %.6f last completion %.6f (monotonic s)", t0, t1);
	}

	struct done d;
	memset(&d, 0, sizeof(d));
	d.sent = f->tx_posted;
	d.sent_imm_sum = f->tx_imm_sum;
	d.recv = f->rx_count;
	d.recv_imm_sum = f->rx_imm_sum;
	d.t_complete = t_complete;
	d.t_first_post = t0;
	oob_send(fd, MSG_DONE, &d, sizeof(d));
	struct result res;
	oob_recv_progress(fd, MSG_RESULT, &res, sizeof(res), f);
	res.err[sizeof(res.err) - 1] = 0;
	oob_send(fd, MSG_BYE, NULL, 0);

	/* client-side checks (pong data / counts in lat mode) */
	int ok = res.ok;
	char cerr[256] = "";
	if (ok && c->mode == MODE_LAT) {
		if (f->rx_count != res.sent || f->rx_imm_sum != res.sent_imm_sum) {
			ok = 0;
			snprintf(cerr, sizeof(cerr), "pongs: received %" PRIu64 ", server sent %" PRIu64,
				 f->rx_count, res.sent);
		} else if (c->size) {
			uint8_t *ref = malloc(c->size);
			fill_pattern(ref, c->size, SALT_SERVER);
			if (memcmp(ref, f->dst, c->size)) {
				ok = 0;
				snprintf(cerr, sizeof(cerr), "pong data mismatch");
			}
			free(ref);
		}
	}
	if (ok && (f->rx_without_data || f->unexpected)) {
		ok = 0;
		snprintf(cerr, sizeof(cerr), "client saw %" PRIu64 " unexpected completions",
			 f->unexpected + f->rx_without_data);
	}

	/* ---- report ---- */
	char mm[256];
	double span = t1 - t0;
	int is_stream = c->mode == MODE_BW || c->mode == MODE_RATE || c->mode == MODE_PAGED;
	printf("{\"provider\": \"%s\"", c->prov);
	json_str("provider_selected", f->info->fabric_attr->prov_name);
	json_str("fabric", f->info->fabric_attr->name);
	json_str("domain", f->info->domain_attr->name);
	json_str("mode", mode_names[c->mode]);
	printf(", \"size\": %" PRIu64 ", \"window\": %" PRIu64 ", \"iters\": %" PRIu64
	       ", \"warmup\": %" PRIu64,
	       c->size, c->window, c->iters, c->warmup);
	if (c->mode == MODE_PAGED)
		printf(", \"pages\": %" PRIu64, c->pages);
	else
		printf(", \"pages\": null");
	printf(", \"delivery_complete\": %s, \"inject\": %s", (c->flags & CFG_DELIVERY) ? "true" : "false",
	       (f->tx_flags & FI_INJECT) ? "true" : "false");
	json_num("gbps_recv", res.gbps_recv, is_stream && res.meas_recv >= 2);
	json_num("gbps_send", span > 0 ? (double)c->iters * (double)c->size / span / 1e9 : 0,
		 is_stream && span > 0);
	json_num("gbps_e2e", res.e2e_span_s > 0 ? (double)c->iters * (double)c->size / res.e2e_span_s / 1e9 : 0,
		 is_stream && res.e2e_span_s > 0);
	json_num("mops", res.mops_recv, is_stream && res.meas_recv >= 2);
	json_num("mops_recv", res.mops_recv, is_stream && res.meas_recv >= 2);
	json_num("mops_e2e", res.e2e_span_s > 0 ? (double)c->iters / res.e2e_span_s / 1e6 : 0,
		 is_stream && res.e2e_span_s > 0);
	json_num("mops_send", span > 0 ? (double)c->iters / span / 1e6 : 0, is_stream && span > 0);
	if (c->mode == MODE_LAT && c->iters) {
		qsort(rtt, c->iters, sizeof(double), cmp_double);
		size_t p99 = (size_t)((double)c->iters * 0.99 + 0.999999);
		if (p99 < 1)
			p99 = 1;
		double sum = 0;
		for (uint64_t i = 0; i < c->iters; i++)
			sum += rtt[i];
		double med = (c->iters % 2) ? rtt[c->iters / 2]
					    : 0.5 * (rtt[c->iters / 2 - 1] + rtt[c->iters / 2]);
		json_num("lat_us_median", med / 2 * 1e6, 1);
		json_num("lat_us_p99", rtt[p99 - 1] / 2 * 1e6, 1);
		json_num("lat_us_min", rtt[0] / 2 * 1e6, 1);
		json_num("lat_us_mean", sum / (double)c->iters / 2 * 1e6, 1);
	} else {
		printf(", \"lat_us_median\": null, \"lat_us_p99\": null");
	}
	int have_cpu = c->iters && c->mode != MODE_DCPROBE;
	json_num("cpu_us_per_op_client", have_cpu ? (cpu1 - cpu0) / (double)c->iters : 0, have_cpu);
	json_num("cpu_us_per_op_server", res.cpu_us_per_op, have_cpu && res.e2e_span_s > 0);
	json_num("elapsed_s", span, is_stream);
	if (c->mode == MODE_DCPROBE) {
		/* >0: our completion came after the target resumed progress */
		json_num("dc_completion_after_target_progress_ms",
			 (t_complete - res.t_progress_start) * 1e3, 1);
		json_num("dc_completion_wait_ms", (t_complete - t0) * 1e3, 1);
		/* when the target application saw the arrival in its CQ */
		json_num("dc_target_arrival_after_progress_ms",
			 (res.t_first_arrival - res.t_progress_start) * 1e3, res.meas_recv > 0);
	}
	printf(", \"writes_sent\": %" PRIu64 ", \"writes_received\": %" PRIu64, d.sent, res.recv);
	printf(", \"first_tx_flags\": \"0x%" PRIx64 "\", \"first_rx_flags\": \"0x%" PRIx64 "\"",
	       f->first_tx_flags, res.first_rx_flags);
	json_str("mr_mode", mr_mode_str(f->mr_mode, mm, sizeof(mm)));
	printf(", \"rx_cq_data\": %s", f->rx_cq_data ? "true" : "false");
	json_str("data_progress", f->info->domain_attr->data_progress == FI_PROGRESS_AUTO
				      ? "auto"
				      : f->info->domain_attr->data_progress == FI_PROGRESS_MANUAL ? "manual"
												   : "unspec");
	json_str("threading", f->info->domain_attr->threading == FI_THREAD_DOMAIN ? "domain"
			      : f->info->domain_attr->threading == FI_THREAD_SAFE ? "safe"
										: "other");
	printf(", \"verified\": %s", ok ? "true" : "false");
	if (!ok)
		json_str("error", res.err[0] ? res.err : cerr);
	else
		printf(", \"error\": null");
	printf("}\n");
	fflush(stdout);

	free(rtt);
	if (pgp)
		free(pg.perm);
	fab_teardown(f);
	close(fd);
	if (!ok) {
		fprintf(stderr, "fi_rawbench[client]: VERIFY FAILED: %s\n", res.err[0] ? res.err : cerr);
		return EXIT_VERIFY;
	}
	return 0;
}

/* ------------------------------------------------------------------ */

static void usage(void)
{
	fprintf(stderr,
		"usage: fi_rawbench -r server [-P port] [-T sec] [-v]\n"
		"       fi_rawbench -r client -P port [-p prov] [-d domain] [-m mode] [-s size]\n"
		"                   [-w window] [-n iters] [-W warmup] [-N pages] [-D] [-i] [-t]\n"
		"                   [-g manual|auto|unspec] [-T sec] [-v]\n"
		"  -p  provider (default \"tcp;ofi_rxm\")    -d  domain (default: lo for IP providers)\n"
		"  -m  bw|rate|lat|paged|dcprobe          -s  bytes per write (default 65536; lat 8)\n"
		"  -w  writes in flight (default 16)      -n  measured writes / round trips\n"
		"  -W  warm-up writes (default max(10%%, 16); lat 10)\n"
		"  -N  paged: pages (required); bw, rate: slots, write i goes to\n"
		"      slot (i %% window) %% slots (default 1)\n"
		"  -D  FI_DELIVERY_COMPLETE\n"
		"  -i  FI_INJECT when size <= inject_size -t  FI_THREAD_SAFE (default FI_THREAD_DOMAIN)\n"
		"  -g  data progress to request (default manual; unspec = provider default)\n"
		"  -T  timeout in seconds (default 60)    -v  verbose (stderr)\n");
	exit(EXIT_USAGE);
}

static uint64_t parse_size(const char *s)
{
	char *end;
	double v = strtod(s, &end);
	if (end == s || v < 0)
		die(EXIT_USAGE, "bad number '%s'", s);
	switch (*end) {
	case 'k': case 'K': v *= 1024; break;
	case 'm': case 'M': v *= 1024 * 1024; break;
	case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
	case 0: break;
	default: die(EXIT_USAGE, "bad number '%s'", s);
	}
	return (uint64_t)v;
}

int main(int argc, char **argv)
{
	struct cfg c;
	int opt, port = -1, is_server = -1;
	int64_t warmup = -1;
	int size_given = 0;
	memset(&c, 0, sizeof(c));
	snprintf(c.prov, sizeof(c.prov), "tcp;ofi_rxm");
	c.mode = MODE_BW;
	c.size = 65536;
	c.window = 16;
	c.iters = 1000;
	c.pages = 64;

	while ((opt = getopt(argc, argv, "r:p:d:P:m:s:w:n:W:N:Ditg:T:vh")) != -1) {
		switch (opt) {
		case 'r':
			if (!strcmp(optarg, "server"))
				is_server = 1;
			else if (!strcmp(optarg, "client"))
				is_server = 0;
			else
				usage();
			break;
		case 'p': snprintf(c.prov, sizeof(c.prov), "%s", optarg); break;
		case 'd': snprintf(c.domain, sizeof(c.domain), "%s", optarg); break;
		case 'P': port = atoi(optarg); break;
		case 'm': {
			int found = 0;
			for (unsigned i = 0; i < sizeof(mode_names) / sizeof(mode_names[0]); i++)
				if (!strcmp(optarg, mode_names[i])) {
					c.mode = i;
					found = 1;
				}
			if (!found)
				usage();
			break;
		}
		case 's': c.size = parse_size(optarg); size_given = 1; break;
		case 'w': c.window = parse_size(optarg); break;
		case 'n': c.iters = parse_size(optarg); break;
		case 'W': warmup = (int64_t)parse_size(optarg); break;
		case 'N': c.pages = parse_size(optarg); break;
		case 'D': c.flags |= CFG_DELIVERY; break;
		case 'i': c.flags |= CFG_INJECT; break;
		case 't': c.flags |= CFG_THREAD_SAFE; break;
		case 'g':
			if (!strcmp(optarg, "auto"))
				c.flags |= CFG_PROG_AUTO;
			else if (!strcmp(optarg, "unspec"))
				c.flags |= CFG_PROG_UNSPEC;
			else if (strcmp(optarg, "manual"))
				usage();
			break;
		case 'T': timeout_s = atoi(optarg); break;
		case 'v': verbose = 1; break;
		default: usage();
		}
	}
	if (is_server < 0 || optind != argc)
		usage();
	role = is_server ? "server" : "client";
	signal(SIGPIPE, SIG_IGN);
	signal(SIGALRM, on_alarm);
	if (timeout_s > 0)
		alarm((unsigned)timeout_s);

	if (is_server)
		return run_server(port < 0 ? 0 : port);

	if (port <= 0)
		die(EXIT_USAGE, "client needs -P <server port>");
	if (c.mode == MODE_LAT) {
		if (!size_given)
			c.size = 8;
		c.window = 1;
	}
	if (c.mode == MODE_DCPROBE) {
		c.iters = 1;
		c.window = 1;
	}
	if (c.window < 1)
		c.window = 1;
	if (c.mode == MODE_PAGED && c.pages < 1)
		die(EXIT_USAGE, "paged mode needs -N >= 1");
	c.warmup = warmup >= 0 ? (uint64_t)warmup : default_warmup(&c);
	if (c.warmup + c.iters >= IMM_PONG_BIT)
		die(EXIT_USAGE, "too many iterations");
	return run_client(&c, port);
}
