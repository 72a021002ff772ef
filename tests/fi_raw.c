/* fi_raw: a bare libfabric peer for the security and bad-peer tests.
 *
 * It is NOT an aiotransfer engine: it sends whatever bytes it is told as a
 * control message (no framing), and issues RMA writes and reads with any
 * key and address, as an attacker on the fabric could.
 *
 *   cc -O1 -Wall -o fi_raw fi_raw.c -lfabric
 *   fi_raw PROVIDER DOMAIN|-        then commands on stdin, one per line:
 *
 *   name                         our own endpoint name       -> OK <hex>
 *   peer HEXNAME                 insert an endpoint name     -> OK <index>
 *   send IDX HEXDATA|-           fi_send (- = empty)         -> OK | ERR ...
 *   write IDX KEY ADDR HEXDATA   fi_write                    -> OK | ERR ...
 *   writedata IDX KEY ADDR DATA HEXDATA   fi_writedata (CQ data)
 *   read IDX KEY ADDR LEN        fi_read                     -> OK <hex> | ERR ...
 *   quit
 *
 * KEY, ADDR, DATA, LEN are unsigned integers (0x... accepted).  Every
 * operation waits for its completion for at most 5 s (TIMEOUT otherwise).
 * Exit status 0 unless libfabric could not be set up (then "SETUP ..."). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_rma.h>

#define BUF_SIZE (1u << 20)
#define MAX_PEERS 64

static struct fid_fabric *fabric;
static struct fid_domain *domain;
static struct fid_ep *ep;
static struct fid_cq *cq;
static struct fid_av *av;
static struct fid_mr *mr;
static void *desc;
static char *buf;
static fi_addr_t peers[MAX_PEERS];
static int npeers;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int unhex(const char *s, char *out, size_t max) {
    size_t n = strlen(s);
    if (strcmp(s, "-") == 0) return 0;
    if (n % 2 || n / 2 > max) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (char)v;
    }
    return (int)(n / 2);
}

/* Wait for the completion of the one operation in flight. */
static void wait_done(void) {
    struct fi_cq_data_entry ent;
    double end = now() + 5.0;
    for (;;) {
        ssize_t rc = fi_cq_read(cq, &ent, 1);
        if (rc == 1) {
            printf("OK\n");
            return;
        }
        if (rc == -FI_EAVAIL) {
            struct fi_cq_err_entry err;
            memset(&err, 0, sizeof(err));
            fi_cq_readerr(cq, &err, 0);
            printf("ERR %d %s\n", err.err, fi_strerror(err.err));
            return;
        }
        if (rc != -FI_EAGAIN) {
            printf("ERR %d %s\n", (int)-rc, fi_strerror((int)-rc));
            return;
        }
        if (now() > end) {
            printf("TIMEOUT\n");
            return;
        }
    }
}

static int setup(const char *prov, const char *dom) {
    struct fi_info *hints = fi_allocinfo(), *info = NULL;
    struct fi_cq_attr cqa = {.format = FI_CQ_FORMAT_DATA, .size = 64};
    struct fi_av_attr ava = {.type = FI_AV_TABLE};
    int rc;
    hints->caps = FI_MSG | FI_RMA | FI_READ | FI_WRITE | FI_SEND | FI_RECV;
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->ep_attr->type = FI_EP_RDM;
    /* a write completes when the target placed it (or refused it) */
    hints->tx_attr->op_flags = FI_DELIVERY_COMPLETE;
    hints->domain_attr->mr_mode =
        FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    hints->fabric_attr->prov_name = strdup(prov);
    if (strcmp(dom, "-") != 0) hints->domain_attr->name = strdup(dom);
    rc = fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &info);
    fi_freeinfo(hints);
    if (rc) { printf("SETUP fi_getinfo %s\n", fi_strerror(-rc)); return rc; }
    if ((rc = fi_fabric(info->fabric_attr, &fabric, NULL))) goto fail;
    if ((rc = fi_domain(fabric, info, &domain, NULL))) goto fail;
    if ((rc = fi_cq_open(domain, &cqa, &cq, NULL))) goto fail;
    if ((rc = fi_av_open(domain, &ava, &av, NULL))) goto fail;
    if ((rc = fi_endpoint(domain, info, &ep, NULL))) goto fail;
    if ((rc = fi_ep_bind(ep, &cq->fid, FI_TRANSMIT | FI_RECV))) goto fail;
    if ((rc = fi_ep_bind(ep, &av->fid, 0))) goto fail;
    if ((rc = fi_enable(ep))) goto fail;
    buf = aligned_alloc(4096, BUF_SIZE);
    memset(buf, 0, BUF_SIZE);
    if ((rc = fi_mr_reg(domain, buf, BUF_SIZE, FI_SEND | FI_RECV | FI_READ | FI_WRITE, 0,
                        0x5eed, 0, &mr, NULL)))
        goto fail;
    if (info->domain_attr->mr_mode & FI_MR_ENDPOINT) {
        if ((rc = fi_mr_bind(mr, &ep->fid, 0)) || (rc = fi_mr_enable(mr))) goto fail;
    }
    desc = fi_mr_desc(mr);
    fi_freeinfo(info);
    return 0;
fail:
    printf("SETUP %s\n", fi_strerror(-rc));
    fi_freeinfo(info);
    return rc;
}

int main(int argc, char **argv) {
    static char line[2 * BUF_SIZE + 256], a[2 * BUF_SIZE + 1];
    static struct fi_context2 ctx;
    if (argc != 3) {
        fprintf(stderr, "usage: fi_raw PROVIDER DOMAIN|-\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (setup(argv[1], argv[2])) return 1;
    printf("READY\n");
    while (fgets(line, sizeof(line), stdin)) {
        char cmd[16];
        unsigned long long idx, key, addr, data, len;
        int n;
        ssize_t rc;
        if (sscanf(line, "%15s", cmd) != 1) continue;
        if (strcmp(cmd, "quit") == 0) break;
        if (strcmp(cmd, "name") == 0) {
            char name[1024];
            size_t len = sizeof(name);
            if (fi_getname(&ep->fid, name, &len)) {
                printf("ERR fi_getname\n");
                continue;
            }
            printf("OK ");
            for (size_t i = 0; i < len; i++) printf("%02x", (unsigned char)name[i]);
            printf("\n");
            continue;
        }
        if (strcmp(cmd, "peer") == 0) {
            char name[1024];
            if (sscanf(line, "%*s %2047s", a) != 1 || (n = unhex(a, name, sizeof(name))) <= 0 ||
                npeers == MAX_PEERS) {
                printf("ERR bad peer\n");
                continue;
            }
            if (fi_av_insert(av, name, 1, &peers[npeers], 0, NULL) != 1) {
                printf("ERR fi_av_insert\n");
                continue;
            }
            printf("OK %d\n", npeers++);
        } else if (strcmp(cmd, "send") == 0) {
            if (sscanf(line, "%*s %llu %s", &idx, a) != 2 || idx >= (unsigned)npeers ||
                (n = unhex(a, buf, BUF_SIZE)) < 0) {
                printf("ERR bad send\n");
                continue;
            }
            do {
                rc = fi_send(ep, buf, (size_t)n, desc, peers[idx], &ctx);
                if (rc == -FI_EAGAIN) fi_cq_read(cq, NULL, 0);
            } while (rc == -FI_EAGAIN);
            if (rc) printf("ERR %d %s\n", (int)-rc, fi_strerror((int)-rc));
            else wait_done();
        } else if (strcmp(cmd, "write") == 0 || strcmp(cmd, "writedata") == 0) {
            int with_data = strcmp(cmd, "writedata") == 0;
            int got = with_data
                ? sscanf(line, "%*s %llu %llu %llu %llu %s", &idx, &key,
                         &addr, &data, a)
                : sscanf(line, "%*s %llu %llu %llu %s", &idx, &key,
                         &addr, a);
            if (got != (with_data ? 5 : 4) || idx >= (unsigned)npeers ||
                (n = unhex(a, buf, BUF_SIZE)) < 0) {
                printf("ERR bad write\n");
                continue;
            }
            do {
                rc = with_data
                    ? fi_writedata(ep, buf, (size_t)n, desc, data, peers[idx], addr, key, &ctx)
                    : fi_write(ep, buf, (size_t)n, desc, peers[idx], addr, key, &ctx);
                if (rc == -FI_EAGAIN) fi_cq_read(cq, NULL, 0);
            } while (rc == -FI_EAGAIN);
            if (rc) printf("ERR %d %s\n", (int)-rc, fi_strerror((int)-rc));
            else wait_done();
        } else if (strcmp(cmd, "read") == 0) {
            if (sscanf(line, "%*s %llu %llu %llu %llu", &idx, &key,
                       &addr, &len) != 4 || idx >= (unsigned)npeers ||
                len > BUF_SIZE) {
                printf("ERR bad read\n");
                continue;
            }
            memset(buf, 0, len);
            do {
                rc = fi_read(ep, buf, (size_t)len, desc, peers[idx], addr, key, &ctx);
                if (rc == -FI_EAGAIN) fi_cq_read(cq, NULL, 0);
            } while (rc == -FI_EAGAIN);
            if (rc) {
                printf("ERR %d %s\n", (int)-rc, fi_strerror((int)-rc));
                continue;
            }
            {
                struct fi_cq_data_entry ent;
                double end = now() + 5.0;
                for (;;) {
                    rc = fi_cq_read(cq, &ent, 1);
                    if (rc == 1) {
                        printf("OK ");
                        for (unsigned long long i = 0; i < len; i++)
                            printf("%02x", (unsigned char)buf[i]);
                        printf("\n");
                        break;
                    }
                    if (rc == -FI_EAVAIL) {
                        struct fi_cq_err_entry err;
                        memset(&err, 0, sizeof(err));
                        fi_cq_readerr(cq, &err, 0);
                        printf("ERR %d %s\n", err.err, fi_strerror(err.err));
                        break;
                    }
                    if (rc != -FI_EAGAIN) {
                        printf("ERR %d %s\n", (int)-rc, fi_strerror((int)-rc));
                        break;
                    }
                    if (now() > end) {
                        printf("TIMEOUT\n");
                        break;
                    }
                }
            }
        } else {
            printf("ERR unknown command\n");
        }
    }
    fi_close(&ep->fid);
    fi_close(&mr->fid);
    fi_close(&av->fid);
    fi_close(&cq->fid);
    fi_close(&domain->fid);
    fi_close(&fabric->fid);
    free(buf);
    return 0;
}
