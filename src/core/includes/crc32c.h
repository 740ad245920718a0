/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI,
 * ext4 and Kafka record batches.  pymq_crc32c(0, "123456789", 9) returns
 * 0xE3069283.  The hardware path (SSE4.2 on x86-64, the CRC extension on
 * ARMv8) is chosen once at run time; elsewhere a slicing-by-8 table runs.
 */
#ifndef PYMQ_CRC32C_H
#define PYMQ_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continue a CRC: pass 0 to start, or the result of an earlier call. */
uint32_t pymq_crc32c(uint32_t crc, const void *data, size_t length);

/* Return the CRC of first followed by second, as if they were one buffer.
 * Two pymq_crc32c calls would each look up the implementation, and the
 * x86-64 path runs short buffers through one chain of crc32 instructions. */
uint32_t pymq_crc32c_pair(const void *first, size_t first_length,
                          const void *second, size_t second_length);

/* The length of the head of pymq_crc32c_head(): a record's header fields
 * before its CRC. */
#define PYMQ_CRC32C_HEAD 28

/* Return pymq_crc32c_pair(head, PYMQ_CRC32C_HEAD, body, length), with the
 * head's words unrolled. */
uint32_t pymq_crc32c_head(const void *head, const void *body, size_t length);

/* Store in out[k] the pymq_crc32c_head() of record k, for k from 0 to 2.
 * On x86-64 the three run side by side. */
void pymq_crc32c_head3(const void *const head[3], const void *const body[3],
                       const size_t length[3], uint32_t out[3]);

/* The portable table path, for tests that compare both implementations. */
uint32_t pymq_crc32c_portable(uint32_t crc, const void *data, size_t length);

/* Name of the implementation in use: "sse4.2", "armv8" or "table". */
const char *pymq_crc32c_impl(void);

#endif
