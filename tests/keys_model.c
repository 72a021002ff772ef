/* Driver for tests/test_shm_keys.py: exercises csrc/shm_keys.c (the shm
 * copy lane's key table) and prints one line per check; exits 1 on the
 * first failure. */
#define _GNU_SOURCE
#include "shm_keys.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures;

#define CHECK(cond, what)                                                   \
    do {                                                                    \
        if (cond) {                                                         \
            printf("ok %s\n", what);                                        \
        } else {                                                            \
            printf("FAIL %s (line %d)\n", what, __LINE__);                  \
            failures++;                                                     \
        }                                                                   \
    } while (0)

static int admit_once(atx_keytab *t, uint64_t key, uint64_t addr, uint64_t len) {
    int r = atx_keytab_admit(t, key, addr, len);
    if (r) atx_keytab_release(t);
    return r;
}

int main(int argc, char **argv) {
    uint64_t id = argc > 1 ? strtoull(argv[1], NULL, 16) : 0x5eed;
    atx_keytab *t = atx_keytab_create(id), *peer;
    uint64_t k = 0x1234567890abcdefULL;
    pid_t child;
    int status;
    struct timespec t0, t1;

    CHECK(t != NULL, "create");
    if (!t) return 1;
    CHECK(atx_keytab_create(id) == NULL && errno == EEXIST, "a second create of one id fails");
    CHECK(atx_keytab_open(id + 1) == NULL, "no table for an unknown engine");
    CHECK(!admit_once(t, k, 1000, 10), "unknown key refused");
    CHECK(atx_keytab_add(t, k, 1000, 100) == 0, "add");
    CHECK(admit_once(t, k, 1000, 100), "the whole region admitted");
    CHECK(admit_once(t, k, 1090, 10), "its last 10 bytes admitted");
    CHECK(!admit_once(t, k, 1050, 51), "one byte past the end refused");
    CHECK(!admit_once(t, k, 999, 2), "one byte before the start refused");
    CHECK(!admit_once(t, k, UINT64_MAX - 4, 10), "a range that wraps refused");
    CHECK(!admit_once(t, k + 1, 1000, 10), "another key refused");

    /* a writer in another process sees the owner's table */
    peer = atx_keytab_open(id);
    CHECK(peer != NULL, "open from a writer");
    CHECK(peer && admit_once(peer, k, 1000, 100), "the writer admits a registered range");
    atx_keytab_remove(t, k);
    CHECK(peer && !admit_once(peer, k, 1000, 100), "a withdrawn key refused to the writer");

    /* a writer killed holding the lock: the owner takes it over */
    atx_keytab_add(t, k + 2, 0, 4096);
    child = fork();
    if (child == 0) {
        atx_keytab *c = atx_keytab_open(id);
        if (!c || !atx_keytab_admit(c, k + 2, 0, 4096)) _exit(2);
        _exit(0);   /* dies with the table locked */
    }
    waitpid(child, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child took the lock and died");
    clock_gettime(CLOCK_MONOTONIC, &t0);
    atx_keytab_remove(t, k + 2);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK((t1.tv_sec - t0.tv_sec) < 5, "remove took over the dead writer's lock");
    CHECK(!admit_once(t, k + 2, 0, 4096), "and the key is withdrawn");

    /* withdrawn keys leave tombstones that later keys reuse: never full */
    {
        int full = 0;
        for (uint64_t i = 0; i < 40000; i++) {
            if (atx_keytab_add(t, 0x9000000000000000ULL + i, 0, 1) != 0) full = 1;
            atx_keytab_remove(t, 0x9000000000000000ULL + i);
        }
        CHECK(!full, "40000 keys added and withdrawn in turn");
    }
    /* 16384 live keys fill it: the next is not added (never admitted) */
    {
        int added = 0;
        for (uint64_t i = 0; i < 16385; i++)
            if (atx_keytab_add(t, 0xa000000000000000ULL + i * 7919, 0, 1) == 0) added++;
        CHECK(added == 16384, "a full table takes no more keys");
        CHECK(admit_once(t, 0xa000000000000000ULL, 0, 1), "a key of the full table admitted");
        CHECK(!admit_once(t, 0xa000000000000000ULL + 16384ULL * 7919, 0, 1),
              "the key that did not fit refused");
    }
    atx_keytab_add(t, k + 3, 0, 64);
    atx_keytab_shut(t);
    CHECK(!admit_once(t, k + 3, 0, 64), "nothing admitted once the owner shut");
    atx_keytab_close(peer, 0);
    atx_keytab_close(t, 1);
    CHECK(atx_keytab_open(id) == NULL, "the name is gone after the owner closed");
    return failures ? 1 : 0;
}
