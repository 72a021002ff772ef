/* Model check of the C core's immediate-counter table (csrc/atx.c: ctab_*,
 * atx_imm_pin): random arrivals, consumptions, pins and unpins over a value
 * space larger than the table's keep limit, in phases that grow the table
 * and drain it again, so that backward-shift deletion, wrap-around probe
 * runs, growth and shrinking all happen.  After every step the touched
 * value is compared with a plain array model; every 250,000 steps all values
 * and the table's count are.  Built and run by tests/test_ctab.py.
 *
 *   usage: ctab_model SEED STEPS KEEP     exit 0 and "ok ..." when it holds */
#include "atx.c"

#define NVALUES 40000

static uint64_t m_avail[NVALUES], m_total[NVALUES];
static uint32_t m_pins[NVALUES];

static int fail(const char *what, uint32_t v, long step) {
    printf("FAIL %s: value %u at step %ld\n", what, v, step);
    return 1;
}

static int check_one(atx_engine *e, uint32_t v, long step) {
    atx_counter *c = ctab_find(e, v, 0);
    if (!c) {
        if (m_avail[v] || m_pins[v]) return fail("counter lost", v, step);
        m_total[v] = 0;   /* forgotten: its total restarts */
        return 0;
    }
    if (c->avail != m_avail[v]) return fail("available", v, step);
    if (c->total != m_total[v]) return fail("total", v, step);
    if (c->pins != m_pins[v]) return fail("pins", v, step);
    return 0;
}

int main(int argc, char **argv) {
    unsigned seed = argc > 1 ? (unsigned)atoi(argv[1]) : 1;
    long steps = argc > 2 ? atol(argv[2]) : 5000000;
    atx_engine *e = calloc(1, sizeof(*e));
    size_t grows = 0, shrinks = 0, last_cap = 0, most = 0;
    if (!e) return 2;
    pthread_mutex_init(&e->imm_lock, NULL);
    e->max_counters = ATX_MAX_COUNTERS;
    e->ctab_keep = argc > 3 ? (size_t)atol(argv[3]) : ATX_CTAB_KEEP;
    e->ctab_key = seed * 2654435761u;
    srand(seed);
    for (long step = 0; step < steps; step++) {
        /* odd phases: arrivals, consumptions, pins; even: drain */
        int fill = (step / 300000) % 2;
        uint32_t v = (uint32_t)(rand() % NVALUES);
        int op = rand() % 10;
        atx_counter *c;
        if (!fill) op = op < 6 ? 5 : 9;
        if (op < 5) {                          /* an arrival */
            c = ctab_find(e, v, 1);
            c->avail++;
            c->total++;
            m_avail[v]++;
            m_total[v]++;
            ctab_drop_if_idle(e, c);
        } else if (op < 8) {                   /* a waiter consumes all there is */
            c = ctab_find(e, v, 0);
            if (c) {
                c->avail = 0;
                ctab_drop_if_idle(e, c);
            }
            m_avail[v] = 0;
        } else if (op == 8) {                  /* an ImmCounter appears */
            atx_imm_pin(e, v, 1);
            m_pins[v]++;
        } else if (m_pins[v]) {                /* ... and goes */
            atx_imm_pin(e, v, 0);
            m_pins[v]--;
        }
        if (check_one(e, v, step)) return 1;
        if (e->ctab_cap > last_cap && last_cap) grows++;
        if (e->ctab_cap < last_cap) shrinks++;
        last_cap = e->ctab_cap;
        if (e->ctab_used > most) most = e->ctab_used;
        if (step % 250000 == 0 || step == steps - 1) {
            size_t n = 0;
            for (uint32_t w = 0; w < NVALUES; w++) {
                if (check_one(e, w, step)) return 1;
                n += ctab_find(e, w, 0) != NULL;
            }
            if (n != e->ctab_used) return fail("count of values", (uint32_t)n, step);
        }
    }
    printf("ok steps %ld grows %zu shrinks %zu most %zu\n", steps, grows, shrinks, most);
    return 0;
}
