/* CRC32C with a hardware path chosen at run time; see crc32c.h. */
#include "crc32c.h"

#include <string.h>

#define PYMQ_CRC32C_POLY 0x82F63B78u

/* Slicing-by-8 tables: table[k][b] is the CRC of byte b followed by k zero
 * bytes, so eight input bytes cost eight lookups and no carried dependency
 * between them. */
static uint32_t crc_table[8][256];
static int crc_table_ready = 0;

static void build_table(void)
{
    uint32_t b, crc;
    int k;

    for (b = 0; b < 256; b++) {
        crc = b;
        for (k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (PYMQ_CRC32C_POLY & (0u - (crc & 1u)));
        crc_table[0][b] = crc;
    }
    for (b = 0; b < 256; b++) {
        crc = crc_table[0][b];
        for (k = 1; k < 8; k++) {
            crc = crc_table[0][crc & 0xFF] ^ (crc >> 8);
            crc_table[k][b] = crc;
        }
    }
    crc_table_ready = 1;
}

uint32_t pymq_crc32c_portable(uint32_t crc, const void *data, size_t length)
{
    const unsigned char *p = (const unsigned char *)data;
    uint64_t word;

    if (!crc_table_ready)
        build_table();
    crc = ~crc;
    while (length && ((uintptr_t)p & 7)) {
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        length--;
    }
    while (length >= 8) {
        /* The tables assume little-endian byte order within the word. */
        word = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 |
               (uint64_t)p[3] << 24 | (uint64_t)p[4] << 32 |
               (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 |
               (uint64_t)p[7] << 56;
        word ^= crc;
        crc = crc_table[7][word & 0xFF] ^
              crc_table[6][(word >> 8) & 0xFF] ^
              crc_table[5][(word >> 16) & 0xFF] ^
              crc_table[4][(word >> 24) & 0xFF] ^
              crc_table[3][(word >> 32) & 0xFF] ^
              crc_table[2][(word >> 40) & 0xFF] ^
              crc_table[1][(word >> 48) & 0xFF] ^
              crc_table[0][(word >> 56) & 0xFF];
        p += 8;
        length -= 8;
    }
    while (length--)
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define PYMQ_CRC32C_HW "sse4.2"

/* Each crc32 instruction waits for the one before it in a chain, so longer
 * buffers are cut into three lanes of equal length that run side by side.
 * On 64 KiB one chain reached 9 GB/s here and three lanes 17 GB/s.
 * Each lane after the first starts from zero.  Because CRC state is linear,
 * the state after lanes A and B is the state after A moved past |B| zero
 * bytes, xor the state of B alone.  lane_shift() makes that move with four
 * table lookups. */
#define LANE_LONG 2048
#define LANE_SHORT 128

/* lane_long[k][b] is the state b << 8k moved past LANE_LONG zero bytes. */
static uint32_t lane_long[4][256];
static uint32_t lane_short[4][256];

static inline uint64_t load_word(const unsigned char *p)
{
    uint64_t word;

    memcpy(&word, p, 8);
    return word;
}

__attribute__((target("sse4.2")))
static uint32_t past_zeros(uint32_t state, size_t length)
{
    uint64_t state64 = state;

    for (; length >= 8; length -= 8)
        state64 = _mm_crc32_u64(state64, 0);
    return (uint32_t)state64;
}

static void build_lane_table(uint32_t table[4][256], size_t length)
{
    uint32_t basis[32], value;
    int bit, k, b;

    for (bit = 0; bit < 32; bit++)
        basis[bit] = past_zeros(1u << bit, length);
    for (k = 0; k < 4; k++) {
        for (b = 0; b < 256; b++) {
            value = 0;
            for (bit = 0; bit < 8; bit++)
                if (b & (1 << bit))
                    value ^= basis[8 * k + bit];
            table[k][b] = value;
        }
    }
}

static void build_lane_tables(void)
{
    build_lane_table(lane_long, LANE_LONG);
    build_lane_table(lane_short, LANE_SHORT);
}

static inline uint32_t lane_shift(const uint32_t table[4][256], uint64_t state)
{
    return table[0][state & 0xFF] ^ table[1][(state >> 8) & 0xFF] ^
           table[2][(state >> 16) & 0xFF] ^ table[3][(state >> 24) & 0xFF];
}

/* Continue the CRC state (not inverted) over a buffer too short for the
 * lanes.  The loop is unrolled because, on records of about 100 bytes, its
 * control would otherwise take more instructions than the crc32 ones. */
__attribute__((target("sse4.2")))
static inline uint32_t crc_hw_chain(uint32_t state, const unsigned char *p,
                                    size_t length)
{
    uint64_t a = state;

    for (; length >= 32; length -= 32, p += 32) {
        a = _mm_crc32_u64(a, load_word(p));
        a = _mm_crc32_u64(a, load_word(p + 8));
        a = _mm_crc32_u64(a, load_word(p + 16));
        a = _mm_crc32_u64(a, load_word(p + 24));
    }
    for (; length >= 8; length -= 8, p += 8)
        a = _mm_crc32_u64(a, load_word(p));
    /* The last bytes go in steps of 4, 2 and 1, not one at a time. */
    state = (uint32_t)a;
    if (length & 4) {
        uint32_t word;

        memcpy(&word, p, 4);
        state = _mm_crc32_u32(state, word);
        p += 4;
    }
    if (length & 2) {
        uint16_t half;

        memcpy(&half, p, 2);
        state = _mm_crc32_u16(state, half);
        p += 2;
    }
    if (length & 1)
        state = _mm_crc32_u8(state, *p);
    return state;
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const void *data, size_t length)
{
    const unsigned char *p = (const unsigned char *)data;
    uint64_t a = (uint32_t)~crc, b, c;
    size_t i;

    while (length >= 3 * LANE_LONG) {
        b = c = 0;
        for (i = 0; i < LANE_LONG; i += 8) {
            a = _mm_crc32_u64(a, load_word(p + i));
            b = _mm_crc32_u64(b, load_word(p + LANE_LONG + i));
            c = _mm_crc32_u64(c, load_word(p + 2 * LANE_LONG + i));
        }
        a = lane_shift(lane_long, lane_shift(lane_long, a) ^ b) ^ c;
        p += 3 * LANE_LONG;
        length -= 3 * LANE_LONG;
    }
    while (length >= 3 * LANE_SHORT) {
        b = c = 0;
        for (i = 0; i < LANE_SHORT; i += 8) {
            a = _mm_crc32_u64(a, load_word(p + i));
            b = _mm_crc32_u64(b, load_word(p + LANE_SHORT + i));
            c = _mm_crc32_u64(c, load_word(p + 2 * LANE_SHORT + i));
        }
        a = lane_shift(lane_short, lane_shift(lane_short, a) ^ b) ^ c;
        p += 3 * LANE_SHORT;
        length -= 3 * LANE_SHORT;
    }
    return ~crc_hw_chain((uint32_t)a, p, length);
}

/* Run both buffers through one chain when neither is long enough for the
 * lanes. */
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw_pair(const void *first, size_t first_length,
                               const void *second, size_t second_length)
{
    uint32_t state;

    if (first_length >= 3 * LANE_SHORT || second_length >= 3 * LANE_SHORT)
        return crc32c_hw(crc32c_hw(0, first, first_length), second,
                         second_length);
    state = crc_hw_chain(0xFFFFFFFFu, (const unsigned char *)first,
                         first_length);
    return ~crc_hw_chain(state, (const unsigned char *)second,
                         second_length);
}

/* Return the CRC of a state (not inverted) continued over a buffer, with
 * the lanes only where the buffer is long enough for them. */
__attribute__((target("sse4.2")))
static inline uint32_t crc_hw_finish(uint32_t state, const unsigned char *p,
                                     size_t length)
{
    if (length >= 3 * LANE_SHORT)
        return crc32c_hw(~state, p, length);
    return ~crc_hw_chain(state, p, length);
}

/* The CRC of a PYMQ_CRC32C_HEAD-byte head followed by a body: a record's
 * header fields and its body.  With the head's length fixed, its words go
 * straight through, without the loops and tests for a buffer of any
 * length, and pymq_crc32c_head() calls it without a function pointer.
 * Checking a record of 100 bytes went from about 91 instructions to 49
 * (callgrind). */
__attribute__((target("sse4.2")))
static inline uint64_t crc_hw_head(uint64_t state, const unsigned char *head)
{
    uint32_t word;

    state = _mm_crc32_u64(state, load_word(head));
    state = _mm_crc32_u64(state, load_word(head + 8));
    state = _mm_crc32_u64(state, load_word(head + 16));
    memcpy(&word, head + 24, 4);
    return _mm_crc32_u32((uint32_t)state, word);
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw_head(const void *head, const void *body,
                               size_t length)
{
    uint64_t state = crc_hw_head(0xFFFFFFFFu, (const unsigned char *)head);

    return crc_hw_finish((uint32_t)state, (const unsigned char *)body,
                         length);
}

/* Three records side by side: each chain of crc32 instructions waits only
 * on itself, so the three chains overlap.  Records of about 100 bytes are
 * too short for the lanes above.  A put_many of 100-byte records took
 * about 15% less time with this (2-core VM). */
__attribute__((target("sse4.2")))
static void crc32c_hw_head3(const void *const head[3],
                            const void *const body[3],
                            const size_t length[3], uint32_t out[3])
{
    const unsigned char *p0 = body[0], *p1 = body[1], *p2 = body[2];
    uint64_t a = crc_hw_head(0xFFFFFFFFu, (const unsigned char *)head[0]);
    uint64_t b = crc_hw_head(0xFFFFFFFFu, (const unsigned char *)head[1]);
    uint64_t c = crc_hw_head(0xFFFFFFFFu, (const unsigned char *)head[2]);
    size_t i, common;

    common = length[0];
    if (length[1] < common)
        common = length[1];
    if (length[2] < common)
        common = length[2];
    common -= common % 8;
    for (i = 0; i < common; i += 8) {
        a = _mm_crc32_u64(a, load_word(p0 + i));
        b = _mm_crc32_u64(b, load_word(p1 + i));
        c = _mm_crc32_u64(c, load_word(p2 + i));
    }
    out[0] = crc_hw_finish((uint32_t)a, p0 + common, length[0] - common);
    out[1] = crc_hw_finish((uint32_t)b, p1 + common, length[1] - common);
    out[2] = crc_hw_finish((uint32_t)c, p2 + common, length[2] - common);
}

static int hw_available(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}

#elif defined(__aarch64__) && defined(__linux__) && \
    (defined(__GNUC__) || defined(__clang__))
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#define PYMQ_CRC32C_HW "armv8"
/* NOTE: this path runs one chain of crc32 instructions, without the three
 * lanes of the x86-64 path. */
static void build_lane_tables(void) {}

__attribute__((target("+crc")))
static uint32_t crc32c_hw(uint32_t crc, const void *data, size_t length)
{
    const unsigned char *p = (const unsigned char *)data;
    uint64_t word;

    crc = ~crc;
    while (length && ((uintptr_t)p & 7)) {
        crc = __crc32cb(crc, *p++);
        length--;
    }
    while (length >= 8) {
        memcpy(&word, p, 8);
        crc = __crc32cd(crc, word);
        p += 8;
        length -= 8;
    }
    while (length--)
        crc = __crc32cb(crc, *p++);
    return ~crc;
}

static int hw_available(void)
{
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}

#define PYMQ_CRC32C_NO_PAIR

#else
#define PYMQ_CRC32C_HW NULL
#define crc32c_hw pymq_crc32c_portable
static int hw_available(void) { return 0; }
static void build_lane_tables(void) {}
#define PYMQ_CRC32C_NO_PAIR
#endif

#ifdef PYMQ_CRC32C_NO_PAIR
/* Without a pair function of its own, a path runs two calls. */
static uint32_t crc32c_hw_pair(const void *first, size_t first_length,
                               const void *second, size_t second_length)
{
    return crc32c_hw(crc32c_hw(0, first, first_length), second,
                     second_length);
}

static uint32_t crc32c_hw_head(const void *head, const void *body,
                               size_t length)
{
    return crc32c_hw_pair(head, PYMQ_CRC32C_HEAD, body, length);
}

static void crc32c_hw_head3(const void *const head[3],
                            const void *const body[3],
                            const size_t length[3], uint32_t out[3])
{
    int k;

    for (k = 0; k < 3; k++)
        out[k] = crc32c_hw_head(head[k], body[k], length[k]);
}
#endif

typedef uint32_t (*crc_function)(uint32_t, const void *, size_t);
typedef uint32_t (*crc_pair_function)(const void *, size_t, const void *,
                                      size_t);

/* Chosen on first use.  The extension module calls pymq_crc32c_impl() while
 * it is imported, under the GIL, so later calls from any thread only read. */
static crc_function crc_selected = NULL;
static crc_pair_function crc_pair_selected = NULL;
static const char *crc_selected_name = "table";
/* 1 once the hardware path is chosen: the fixed-head functions branch on
 * it instead of calling through a pointer. */
static int crc_hw_selected = 0;

static uint32_t crc_portable_pair(const void *first, size_t first_length,
                                  const void *second, size_t second_length)
{
    return pymq_crc32c_portable(pymq_crc32c_portable(0, first, first_length),
                                second, second_length);
}

static void select_impl(void)
{
    if (PYMQ_CRC32C_HW != NULL && hw_available()) {
        build_lane_tables();
        crc_selected_name = PYMQ_CRC32C_HW;
        crc_pair_selected = crc32c_hw_pair;
        crc_hw_selected = 1;
        crc_selected = crc32c_hw;
    } else {
        build_table();
        crc_selected_name = "table";
        crc_pair_selected = crc_portable_pair;
        crc_selected = pymq_crc32c_portable;
    }
}

uint32_t pymq_crc32c(uint32_t crc, const void *data, size_t length)
{
    if (crc_selected == NULL)
        select_impl();
    return crc_selected(crc, data, length);
}

uint32_t pymq_crc32c_pair(const void *first, size_t first_length,
                          const void *second, size_t second_length)
{
    if (crc_selected == NULL)
        select_impl();
    return crc_pair_selected(first, first_length, second, second_length);
}

uint32_t pymq_crc32c_head(const void *head, const void *body, size_t length)
{
    if (crc_hw_selected)
        return crc32c_hw_head(head, body, length);
    return pymq_crc32c_pair(head, PYMQ_CRC32C_HEAD, body, length);
}

void pymq_crc32c_head3(const void *const head[3], const void *const body[3],
                       const size_t length[3], uint32_t out[3])
{
    int k;

    if (crc_hw_selected) {
        crc32c_hw_head3(head, body, length, out);
        return;
    }
    for (k = 0; k < 3; k++)
        out[k] = pymq_crc32c_pair(head[k], PYMQ_CRC32C_HEAD, body[k],
                                  length[k]);
}

const char *pymq_crc32c_impl(void)
{
    if (crc_selected == NULL)
        select_impl();
    return crc_selected_name;
}
