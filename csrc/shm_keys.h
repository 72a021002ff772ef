/* The shm copy lane's key table: which regions of a shm engine peers may
 * still copy into (see shm_keys.c). */
#ifndef ATX_SHM_KEYS_H
#define ATX_SHM_KEYS_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

typedef struct atx_keytab atx_keytab;

/* Create the table of engine `engine_id` (/dev/shm/atx-keys-<id>, this
 * process its owner); NULL on failure (errno set). */
atx_keytab *atx_keytab_create(uint64_t engine_id);
/* Map the table of a peer engine; NULL if it has none (errno set). */
atx_keytab *atx_keytab_open(uint64_t engine_id);
/* Unmap; the owner (unlink=1) also removes the name. */
void atx_keytab_close(atx_keytab *t, int unlink_name);

/* Owner: a region peers may copy into (key, its first address, length);
 * 0, or -1 if the table is full (that region is then never admitted). */
int atx_keytab_add(atx_keytab *t, uint64_t key, uint64_t base, uint64_t len);
/* Owner: withdraw a key; once this returns no copy into it is going on
 * and none starts. */
void atx_keytab_remove(atx_keytab *t, uint64_t key);
/* Owner: withdraw every key (the engine stops). */
void atx_keytab_shut(atx_keytab *t);

/* Writer: may [addr, addr + len) of region `key` be copied into now?  1:
 * yes, and the table stays locked (no key can be withdrawn) until
 * atx_keytab_release; 0: no, not locked. */
int atx_keytab_admit(atx_keytab *t, uint64_t key, uint64_t addr, uint64_t len);
void atx_keytab_release(atx_keytab *t);

#ifdef __cplusplus
}
#endif
#endif
