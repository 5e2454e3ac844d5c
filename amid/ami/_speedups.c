/* amid.ami._speedups: the read path's hot loops in C, an optional leaf.
 *
 * Every rule here is written once in Python, by the module that owns it; each function below
 * replaces one Python step behind the same inputs and gives the same result, or declines
 * (returns None, or False) what it does not take, and the caller runs its Python reference.
 * amid.ami._accel loads this module and hands its functions out by name; nothing here imports
 * amid. What is here, in the order a read goes through it:
 *   frame_crlf     a read's bytes framed into Events; reference: Parser._feed_general
 *                  (amid.ami.protocol)
 *   stamp_events   the session's envelope on a read's events; reference: the loop of
 *                  AMIClient._dispatch_messages (amid.ami.session)
 *   records_of     the router's Record per event; reference: Record.of_event (amid.records)
 *   records_json   a sink batch's record JSON; reference: Record.json (amid.records)
 *   record_json    one record's JSON; reference: encode_record(record_dict(...)) (amid._encode)
 *   parse_fields   Message.fields of a plain message; reference: _parse_fields (protocol)
 * The tests (tests/test_speedups.py, and tests/test_protocol.py run with and without it)
 * compare each one with its reference under amid.ami._accel.pure_python().
 *
 * The record JSON (scan_fields + write_fields) takes one AMI message ("Key: Value" lines
 * joined by CRLF, the terminator already removed by the framing) and writes the JSON object
 * of its fields, {"Key":"Value",...}, in one pass over the bytes. It takes only the plain
 * common case and declines anything else. It takes:
 *   - every line is <key>": "<value>: the key ends at the line's first colon, which a space
 *     follows (the value is the rest of the line, ": " included);
 *   - lines are separated by CRLF only (no bare CR or LF);
 *   - ASCII only, no control character, no DEL, no backslash ('"' gets a backslash);
 *   - a repeated key becomes a JSON array of its values, at its first line (as
 *     Message.to_dict() has it);
 *   - at most MAX_LINES lines.
 * For every message it takes, the result is byte for byte what the reference
 * (Message.to_dict() through pydantic_core.to_json) gives (tested with hypothesis).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define MAX_LINES 512

/* What each byte is to the scanner. PLAIN bytes may stand in a JSON string as they are. */
enum { REFUSED = 0, PLAIN, QUOTE, COLON, CR, NON_ASCII };
static unsigned char byte_class[256];

static void init_byte_class(void) {
    for (int b = 0; b < 256; b++)
        byte_class[b] = b >= 0x80 ? NON_ASCII : (b >= 0x20 && b < 0x7f) ? PLAIN : REFUSED;
    byte_class['"'] = QUOTE;
    byte_class['\\'] = REFUSED;
    byte_class[':'] = COLON;
    byte_class['\r'] = CR;
}

/* Eight bytes at a time (SWAR, portable C): a mask with the high bit of each byte of x that is
 * not PLAIN. Each term is the classic "has a zero byte" bit trick, whose borrows can only set
 * bits above a byte that really matches: the lowest set bit of the mask is always exact, which
 * is all the scanner uses (the position of the first special byte, read little-endian). */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

static inline uint64_t has_zero_byte(uint64_t v) {
    return (v - ONES) & ~v & HIGHS;
}

static inline uint64_t special_bytes(uint64_t x, int colon) {
    return ((x - ONES * 0x20) & ~x & HIGHS)  /* below 0x20: controls, CR, LF */
        | (x & HIGHS)                          /* non-ASCII */
        | has_zero_byte(x ^ (ONES * 0x7f))     /* DEL */
        | has_zero_byte(x ^ (ONES * '"'))
        | has_zero_byte(x ^ (ONES * '\\'))
        | (colon ? has_zero_byte(x ^ (ONES * ':')) : 0);
}

#if defined(__SSE2__)
#include <emmintrin.h>
/* Sixteen bytes at a time where SSE2 is there (every x86-64): most keys and many values fit
 * in one load, so the loop below usually ends on its first test, a branch the CPU predicts
 * (the 8-byte loop's exit after one or two words is what it mispredicted most). One bit per
 * byte that is not PLAIN (':' only when colon is set). */
static inline unsigned special16(const unsigned char *p, int colon) {
    const __m128i x = _mm_loadu_si128((const __m128i *)p);
    /* x < 0x20, unsigned, as a signed compare of x ^ 0x80 with 0x20 ^ 0x80 */
    const __m128i controls = _mm_cmplt_epi8(_mm_xor_si128(x, _mm_set1_epi8((char)0x80)),
                                            _mm_set1_epi8((char)(0x20 ^ 0x80)));
    __m128i any = _mm_or_si128(
        _mm_or_si128(controls, _mm_cmpeq_epi8(x, _mm_set1_epi8(0x7f))),
        _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8('"')), _mm_cmpeq_epi8(x, _mm_set1_epi8('\\'))));
    if (colon)
        any = _mm_or_si128(any, _mm_cmpeq_epi8(x, _mm_set1_epi8(':')));
    /* the high bit of each byte: non-ASCII */
    return (unsigned)_mm_movemask_epi8(any) | (unsigned)_mm_movemask_epi8(x);
}
#endif

static inline uint64_t load_le64(const unsigned char *p) {
    uint64_t x;
    memcpy(&x, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap64(x);
#endif
    return x;
}

/* The first byte at or after i that is not PLAIN (the NUL at raw[size] if none is); with colon
 * 0, a ":" may be passed over (the value scan takes it as text). */
static inline Py_ssize_t skip_plain(const unsigned char *raw, Py_ssize_t i, Py_ssize_t size,
                                    int colon) {
#if defined(__SSE2__)
    while (i + 16 <= size) {
        const unsigned mask = special16(raw + i, colon);
        if (mask)
            return i + __builtin_ctz(mask);
        i += 16;
    }
#endif
    while (i + 8 <= size) {
        const uint64_t mask = special_bytes(load_le64(raw + i), colon);
        if (mask)
            return i + (__builtin_ctzll(mask) >> 3);
        i += 8;
    }
    while (byte_class[raw[i]] == PLAIN)
        i++;
    return i;
}

static inline unsigned int key_hash(const unsigned char *key, Py_ssize_t len) {
    uint64_t head = 0, tail = 0;
    const size_t n = len < 8 ? (size_t)len : 8;
    memcpy(&head, key, n);
    memcpy(&tail, key + len - (Py_ssize_t)n, n);
    uint64_t h = ((uint64_t)len * 0x9E3779B97F4A7C15ULL) ^ head ^ (tail * 0xC2B2AE3D27D4EB4FULL);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    return (unsigned int)(h >> 32);
}

static inline void copy_escaped(unsigned char **out, const unsigned char *from, Py_ssize_t len,
                                int has_quotes) {
    if (!has_quotes) {
        memcpy(*out, from, (size_t)len);
        *out += len;
        return;
    }
    unsigned char *o = *out;
    for (Py_ssize_t k = 0; k < len; k++) {
        if (from[k] == '"')
            *o++ = '\\';
        *o++ = from[k];
    }
    *out = o;
}

/* Where a message's keys and values are, as pass 1 found them. */
typedef struct {
    Py_ssize_t key_start[MAX_LINES], key_end[MAX_LINES], value_end[MAX_LINES];
    uint32_t key_quotes[MAX_LINES], value_quotes[MAX_LINES];
    /* A repeated key becomes one JSON array at its first line: first[line] is that line,
     * next[line] the next line with the same key (0: none; lines are numbered from 1 here). */
    unsigned short first[MAX_LINES], next[MAX_LINES];
    int lines;
    int repeats;          /* some key repeats */
    Py_ssize_t quotes;    /* in the whole message */
    Py_ssize_t json_size; /* the fields object's length in bytes */
} Scan;

enum { SCAN_OK = 1, SCAN_DECLINED = 0 };

/* Pass 1: check the rules, note where each key and value is, count the quotes, group the
 * repeated keys. CPython keeps a NUL after a bytes object's data: a REFUSED byte that stops
 * every scan loop at the end without a bounds check in the loop. */
static int scan_fields(const unsigned char *raw, Py_ssize_t size, Scan *scan) {
    if (size == 0)
        return SCAN_DECLINED;
    if (size > (Py_ssize_t)UINT32_MAX)
        return SCAN_DECLINED; /* the per-line quote counts are 32 bits: Python takes these */
    int lines = 0;
    Py_ssize_t quotes = 0;
    Py_ssize_t i = 0;
    while (1) {
        if (lines == MAX_LINES)
            return SCAN_DECLINED;
        /* the key: up to the first colon, which a space must follow */
        scan->key_start[lines] = i;
        uint32_t key_quotes = 0, value_quotes = 0;
        while (1) {
            i = skip_plain(raw, i, size, 1);
            const unsigned char c = byte_class[raw[i]];
            if (c == COLON)
                break;
            if (c == QUOTE) {
                key_quotes++;
                i++;
                continue;
            }
            if (c == NON_ASCII)
                return SCAN_DECLINED;
            return SCAN_DECLINED; /* the end, or CR/LF (a line without a colon), a control char, '\\' */
        }
        if (i + 1 >= size || raw[i + 1] != ' ')
            return SCAN_DECLINED;
        scan->key_end[lines] = i;
        i += 2;
        /* the value: the rest of the line, up to CRLF or the end (colons are plain there) */
        while (1) {
            i = skip_plain(raw, i, size, 0); /* colons are plain in a value */
            const unsigned char c = byte_class[raw[i]];
            if (c == COLON) {
                i++;
                continue;
            }
            if (c == QUOTE) {
                value_quotes++;
                i++;
                continue;
            }
            if (c == CR && raw[i + 1] == '\n')  /* raw[size] is the NUL: in bounds */
                break;
            if (i == size)
                break;
            if (c == NON_ASCII)
                return SCAN_DECLINED;
            return SCAN_DECLINED;
        }
        scan->value_end[lines] = i;
        scan->key_quotes[lines] = key_quotes;
        scan->value_quotes[lines] = value_quotes;
        quotes += key_quotes + value_quotes;
        lines++;
        if (i == size)
            break;
        i += 2; /* CRLF: the next line (an empty last line has no colon and is refused) */
    }

    /* Group the keys: an open-addressing set of them, hashed on length, head and tail. */
    unsigned short slots[2 * MAX_LINES];
    unsigned short last[MAX_LINES]; /* per group leader: its group's last line (from 1) */
    unsigned int mask = 31;
    while (mask + 1 < 2 * (unsigned int)lines)
        mask = mask * 2 + 1;
    memset(slots, 0, (mask + 1) * sizeof slots[0]);
    int repeats = 0;
    for (int line = 0; line < lines; line++) {
        const unsigned char *key = raw + scan->key_start[line];
        const Py_ssize_t len = scan->key_end[line] - scan->key_start[line];
        unsigned int slot = key_hash(key, len) & mask;
        int leader = -1;
        while (slots[slot]) {
            const int other = slots[slot] - 1;
            if (scan->key_end[other] - scan->key_start[other] == len
                    && memcmp(raw + scan->key_start[other], key, (size_t)len) == 0) {
                leader = other;
                break;
            }
            slot = (slot + 1) & mask;
        }
        scan->next[line] = 0;
        if (leader < 0) {
            slots[slot] = (unsigned short)(line + 1);
            scan->first[line] = (unsigned short)line;
            last[line] = (unsigned short)(line + 1);
        } else {
            repeats = 1;
            scan->first[line] = (unsigned short)leader;
            scan->next[last[leader] - 1] = (unsigned short)(line + 1);
            last[leader] = (unsigned short)(line + 1);
        }
    }
    scan->lines = lines;
    scan->repeats = repeats;
    scan->quotes = quotes;
    if (!repeats) {
        /* Each CRLF becomes "," (one byte more), each separating ": " becomes ":" (one more),
         * each '"' gets a backslash, plus {" and "} around it all. */
        scan->json_size = size + quotes + (lines - 1) + lines + 4;
        return SCAN_OK;
    }
    /* With arrays: "K":"V" for a single key, "K":["V1","V2"] for a repeated one. */
    Py_ssize_t total = 2; /* { } */
    int groups = 0;
    for (int line = 0; line < lines; line++) {
        if (scan->first[line] != line)
            continue;
        groups++;
        total += scan->key_end[line] - scan->key_start[line] + scan->key_quotes[line] + 3; /* "K": */
        const int repeated = scan->next[line] != 0;
        total += repeated ? 2 : 0; /* [ ] */
        int values = 0;
        for (int member = line; ; member = scan->next[member] - 1) {
            const Py_ssize_t value_start = scan->key_end[member] + 2;
            total += scan->value_end[member] - value_start + scan->value_quotes[member] + 2;
            values++;
            if (!scan->next[member])
                break;
        }
        total += values - 1; /* commas between the values */
    }
    total += groups - 1; /* commas between the keys */
    scan->json_size = total;
    return SCAN_OK;
}

/* Pass 2: write the fields object (scan->json_size bytes) at out; returns the end. */
static unsigned char *write_fields(unsigned char *out, const unsigned char *raw, const Scan *scan) {
    const int has_quotes = scan->quotes != 0;
    const int lines = scan->lines;
    *out++ = '{';
    int written = 0;
    for (int line = 0; line < lines; line++) {
        if (scan->repeats && scan->first[line] != line)
            continue; /* written in its key's array */
        if (written++)
            *out++ = ',';
        *out++ = '"';
        copy_escaped(&out, raw + scan->key_start[line], scan->key_end[line] - scan->key_start[line],
                     has_quotes);
        *out++ = '"';
        *out++ = ':';
        const int repeated = scan->repeats && scan->next[line] != 0;
        if (repeated)
            *out++ = '[';
        for (int member = line; ; member = scan->next[member] - 1) {
            const Py_ssize_t value_start = scan->key_end[member] + 2;
            *out++ = '"';
            copy_escaped(&out, raw + value_start, scan->value_end[member] - value_start, has_quotes);
            *out++ = '"';
            if (!repeated || !scan->next[member])
                break;
            *out++ = ',';
        }
        if (repeated)
            *out++ = ']';
    }
    *out++ = '}';
    return out;
}

static const char RECEIVED_AT[] = ",\"received_at\":\"";
static const char EVENT[] = "\",\"event\":\"";
static const char FIELDS[] = "\",\"fields\":";

/* n in decimal at out (at most 20 bytes); returns the length. As "%lld", without printf. */
static int format_int(char *out, long long n) {
    char digits[24];
    int len = 0;
    unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
    do {
        digits[len++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    int k = 0;
    if (n < 0)
        out[k++] = '-';
    while (len)
        out[k++] = digits[--len];
    return k;
}

/* The whole record JSON in one buffer (see record_json() below); scan is raw's pass 1. */
static PyObject *build_record(const unsigned char *head, Py_ssize_t head_len,
                              const unsigned char *mid, Py_ssize_t mid_len,
                              const char *seq_text, Py_ssize_t seq_len, int seq_in_id,
                              const unsigned char *received, Py_ssize_t received_len,
                              const unsigned char *name, Py_ssize_t name_len,
                              const unsigned char *raw, const Scan *scan) {
    const Py_ssize_t total = head_len + (seq_in_id ? seq_len : 0) + mid_len + seq_len
        + (Py_ssize_t)(sizeof RECEIVED_AT - 1) + received_len + (Py_ssize_t)(sizeof EVENT - 1)
        + name_len + (Py_ssize_t)(sizeof FIELDS - 1) + scan->json_size + 1;
    PyObject *result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        return NULL;
    unsigned char *const first = (unsigned char *)PyBytes_AS_STRING(result);
    unsigned char *out = first;
#define PUT(data, len) do { memcpy(out, (data), (size_t)(len)); out += (len); } while (0)
    PUT(head, head_len);
    if (seq_in_id)
        PUT(seq_text, seq_len);
    PUT(mid, mid_len);
    PUT(seq_text, seq_len);
    PUT(RECEIVED_AT, sizeof RECEIVED_AT - 1);
    PUT(received, received_len);
    PUT(EVENT, sizeof EVENT - 1);
    PUT(name, name_len);
    PUT(FIELDS, sizeof FIELDS - 1);
#undef PUT
    out = write_fields(out, raw, scan);
    *out++ = '}';
    if (out - first != total) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_SystemError, "amid.ami._speedups: record size mismatch");
        return NULL;
    }
    return result;
}

/* record_json(head, mid, seq, received_at, name, raw, seq_in_id=True): the whole record JSON
 * in one buffer,
 *   head + [seq] + mid + seq + ',"received_at":"' + received_at + '","event":"' + name
 *   + '","fields":' + <the fields object of raw> + '}'
 * where, for a wire record (seq_in_id), head is '{"id":"<server>:<run>:<epoch>:' and mid
 * '","server":"<server>","epoch":<epoch>,"seq":'; for a record whose id is given, head is
 * '{"id":"<id>' (amid._encode escapes every text with the reference serializer). None when
 * it declines the message (see the header) or seq is beyond 64 bits: the reference
 * (amid._encode.encode_record) encodes it then. */
static PyObject *record_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs < 6 || nargs > 7 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])
            || !PyLong_Check(args[2]) || !PyBytes_Check(args[3]) || !PyBytes_Check(args[4])
            || !PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError,
                        "record_json(head: bytes, mid: bytes, seq: int, received_at: bytes, "
                        "name: bytes, raw: bytes, seq_in_id: bool = True)");
        return NULL;
    }
    const int seq_in_id = nargs == 7 ? PyObject_IsTrue(args[6]) : 1;
    if (seq_in_id < 0)
        return NULL;
    const long long seq = PyLong_AsLongLong(args[2]);
    if (seq == -1 && PyErr_Occurred()) {
        PyErr_Clear(); /* beyond 64 bits: Python formats it */
        Py_RETURN_NONE;
    }
    char seq_text[24];
    const int seq_len = format_int(seq_text, seq);
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(args[5]);
    Scan scan;
    const int status = scan_fields(raw, PyBytes_GET_SIZE(args[5]), &scan);
    if (status != SCAN_OK)
        Py_RETURN_NONE;
    return build_record((const unsigned char *)PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]),
                        (const unsigned char *)PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]),
                        seq_text, seq_len, seq_in_id,
                        (const unsigned char *)PyBytes_AS_STRING(args[3]), PyBytes_GET_SIZE(args[3]),
                        (const unsigned char *)PyBytes_AS_STRING(args[4]), PyBytes_GET_SIZE(args[4]),
                        raw, &scan);
}

/* ------------------------------------------------------------------ objects built in C
 *
 * The read path makes one Event per message and one Record per event. Built in Python, each
 * costs a call and nine or ten attribute stores; here they are allocated and their __slots__
 * filled directly. bind_event() and bind_record() look the slots up once, from the classes'
 * member descriptors (refusing anything but plain object slots), so the Python classes stay
 * the one definition of what an Event and a Record hold; Event's defaults are copied from an
 * instance Python made. Only objects of exactly the bound classes are made or read here.
 *
 * WHY OFFSETS: the slots are written at the offsets their member descriptors give, not through
 * the type. The alternatives were measured or weighed: calling the class (vectorcall) runs
 * Event.__init__, a Python frame per event: 440 ns an event on the s09a capture, against
 * 550 ns for all the C framing does per event (scan, copy of the bytes, name, Event), so
 * framing would be almost twice as slow; setting each slot through its descriptor is a
 * lookup and a call per slot for the same stores; defining Event and Record as C types
 * would make the C the definition, and the pure-Python path would need a second one. The
 * offsets are what CPython's own member descriptors use; slot_offsets() checks once, per
 * class, that each name is a plain writable object slot inside the instance, that no two
 * names share one, and that no base has a tp_new these objects would skip.
 *
 * UNTRACKED: the Events and Records made here are left out of the cyclic garbage collector's
 * lists (as CPython does for tuples and dicts that hold only atoms). amid never makes a
 * reference cycle through them: an Event holds bytes, strs, numbers and, built later, lists
 * and dicts of strs; a Record holds those and its Event. (A library user who stores in an
 * Event's slot an object that refers back to the Event makes a cycle the collector will not
 * free; nothing else changes.) Under load the sinks' queues hold up to hundreds of thousands
 * of them, which each collection would otherwise traverse. Reference counting frees them as
 * before.
 *
 * Python code can run inside these functions (the collector's finalizers on an allocation,
 * the callbacks of records_json, a slot's old value released): they work on tuples that own
 * the objects, and hold every object they use across such a point. */

#if PY_VERSION_HEX < 0x030C0000
#include "structmember.h"
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

static int slot_offsets(PyTypeObject *cls, const char *const *names, int count,
                        Py_ssize_t *offsets) {
    if (cls->tp_itemsize != 0 || cls->tp_alloc == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: not a plain class with __slots__", cls->tp_name);
        return -1;
    }
    /* tp_alloc skips tp_new: only Python classes over object (no dict, Exception, ... base
     * whose invariants its tp_new sets) may be filled this way. */
    for (const PyTypeObject *base = cls; base != &PyBaseObject_Type; base = base->tp_base) {
        if (base == NULL || !(base->tp_flags & Py_TPFLAGS_HEAPTYPE)
                || base->tp_dealloc != cls->tp_dealloc) {
            PyErr_Format(PyExc_TypeError, "%s: not a plain class with __slots__", cls->tp_name);
            return -1;
        }
    }
    for (int k = 0; k < count; k++) {
        PyObject *descr = PyObject_GetAttrString((PyObject *)cls, names[k]);
        if (descr == NULL)
            return -1;
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && PyType_IsSubtype(cls, PyDescr_TYPE(descr));
        if (ok) {
            const PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            ok = member->type == Py_T_OBJECT_EX && !(member->flags & Py_READONLY)
                && member->offset >= (Py_ssize_t)sizeof(PyObject)
                && member->offset + (Py_ssize_t)sizeof(PyObject *) <= cls->tp_basicsize;
            offsets[k] = member->offset;
            for (int j = 0; j < k; j++)
                ok = ok && offsets[j] != offsets[k]; /* one slot under two names */
        }
        Py_DECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ slot", cls->tp_name, names[k]);
            return -1;
        }
    }
    return 0;
}

#define SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

/* Store a new reference (the slot of a fresh object is NULL). */
static inline void slot_put(PyObject *obj, Py_ssize_t offset, PyObject *value) {
    Py_INCREF(value);
    SLOT(obj, offset) = value;
}

enum { EV_RAW, EV_NAME, EV_FIELDS, EV_INDEX, EV_SERVER, EV_EPOCH, EV_SEQ, EV_RECEIVED_AT, EV_SLOTS };
static const char *const event_slot_names[EV_SLOTS] = {
    "raw", "name", "_fields", "_index", "server", "epoch", "seq", "received_at"};
static PyTypeObject *event_type;
static Py_ssize_t event_offsets[EV_SLOTS];
static PyObject *event_defaults[EV_SLOTS]; /* from the template; raw and name unused */

static PyObject *bind_event(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyType_Check(args[0]) || !Py_IS_TYPE(args[1], (PyTypeObject *)args[0])) {
        PyErr_SetString(PyExc_TypeError, "bind_event(Event, template: Event)");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    Py_ssize_t offsets[EV_SLOTS];
    if (slot_offsets(cls, event_slot_names, EV_SLOTS, offsets) < 0)
        return NULL;
    for (int k = EV_FIELDS; k < EV_SLOTS; k++) {
        if (SLOT(args[1], offsets[k]) == NULL) {
            PyErr_Format(PyExc_TypeError, "the template Event has no %s", event_slot_names[k]);
            return NULL;
        }
    }
    if (event_type != NULL) {
        /* Bound once per process: the objects being built hold the first binding's state. */
        if (event_type == cls)
            Py_RETURN_NONE;
        PyErr_SetString(PyExc_RuntimeError, "bind_event(): already bound to another class");
        return NULL;
    }
    for (int k = 0; k < EV_SLOTS; k++) {
        event_offsets[k] = offsets[k];
        Py_XSETREF(event_defaults[k], k >= EV_FIELDS ? Py_NewRef(SLOT(args[1], offsets[k])) : NULL);
    }
    Py_INCREF(cls);
    Py_XSETREF(event_type, cls);
    Py_RETURN_NONE;
}

/* A str of ASCII bytes (checked by the caller): no decoding. */
static PyObject *ascii_text(const unsigned char *start, Py_ssize_t len) {
    PyObject *text = PyUnicode_New(len, 127);
    if (text != NULL)
        memcpy(PyUnicode_DATA(text), start, (size_t)len);
    return text;
}

/* Texts that repeat on every event (event names, field keys) are made once: each is kept per
 * slot of a small table (slots: a power of two), found by its bytes, so events share one str
 * instead of each decoding its own. Only ASCII texts of up to 64 bytes are kept. */
static PyObject *shared_text(PyObject **table, unsigned int slots, const unsigned char *start,
                             Py_ssize_t len, int ascii) {
    const unsigned int slot = key_hash(start, len) & (slots - 1);
    PyObject *known = table[slot];
    if (known != NULL && PyUnicode_GET_LENGTH(known) == len
            && memcmp(PyUnicode_DATA(known), start, (size_t)len) == 0)
        return Py_NewRef(known);
    PyObject *text = ascii ? ascii_text(start, len)
        : PyUnicode_DecodeUTF8((const char *)start, len, "surrogateescape");
    if (text != NULL && len <= 64 && PyUnicode_IS_ASCII(text))
        Py_XSETREF(table[slot], Py_NewRef(text));
    return text;
}

#define NAME_SLOTS 256
static PyObject *name_cache[NAME_SLOTS];

static PyObject *new_event(const unsigned char *start, Py_ssize_t len) {
    /* The name: "Event: " up to the first CRLF (the framing let no bare LF through). */
    const unsigned char *nl = memchr(start + 7, '\n', (size_t)(len - 7));
    const Py_ssize_t name_len = (nl == NULL ? start + len : nl - 1) - (start + 7);
    PyObject *raw = PyBytes_FromStringAndSize((const char *)start, len);
    if (raw == NULL)
        return NULL;
    PyObject *name = shared_text(name_cache, NAME_SLOTS, start + 7, name_len, 0);
    if (name == NULL) {
        Py_DECREF(raw);
        return NULL;
    }
    PyObject *event = event_type->tp_alloc(event_type, 0);
    if (event == NULL) {
        Py_DECREF(raw);
        Py_DECREF(name);
        return NULL;
    }
    SLOT(event, event_offsets[EV_RAW]) = raw;
    SLOT(event, event_offsets[EV_NAME]) = name;
    for (int k = EV_FIELDS; k < EV_SLOTS; k++)
        slot_put(event, event_offsets[k], event_defaults[k]);
    PyObject_GC_UnTrack(event); /* see UNTRACKED */
    return event;
}

/* frame_crlf(buf, max_message_bytes, max_fields) -> (messages, consumed, others) | None
 *
 * Parser._feed_general (amid.ami.protocol) for the stream as Asterisk writes it: None unless
 * every LF in buf follows a CR (else, or when a message or the unfinished rest is near a
 * bound, the reference frames the read); otherwise buf[:consumed] split on CRLF CRLF, each
 * message an Event when it starts with "Event: " (its name decoded as the reference does),
 * else its bytes (others counts those: blank ones and other kinds, which Parser._framed turns
 * into messages as the reference does). */
static PyObject *frame_crlf(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "frame_crlf(buf: bytes, max_message_bytes: int, max_fields: int)");
        return NULL;
    }
    if (event_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "frame_crlf() before bind_event()");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0]) || !PyLong_Check(args[1]) || !PyLong_Check(args[2]))
        Py_RETURN_NONE; /* a bytearray, float bounds...: Python frames it */
    /* Bounds beyond 64 bits act as none (or, negative, as always exceeded), as in Python. */
    int over_bytes, over_fields;
    long long max_bytes = PyLong_AsLongLongAndOverflow(args[1], &over_bytes);
    long long max_fields = PyLong_AsLongLongAndOverflow(args[2], &over_fields);
    if ((max_bytes == -1 || max_fields == -1) && PyErr_Occurred())
        return NULL;
    if (over_bytes)
        max_bytes = over_bytes > 0 ? LLONG_MAX : LLONG_MIN;
    if (over_fields)
        max_fields = over_fields > 0 ? LLONG_MAX : LLONG_MIN;
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const Py_ssize_t size = PyBytes_GET_SIZE(args[0]);

    /* Pass 1: the message boundaries (ends[k]: where message k's terminator starts). */
    Py_ssize_t ends_stack[256], *ends = ends_stack, capacity = 256, count = 0;
    Py_ssize_t start = 0, longest = 0;
    const unsigned char *p = buf, *const stop = buf + size;
    PyObject *result = NULL;
    while (p < stop) {
        const unsigned char *nl = memchr(p, '\n', (size_t)(stop - p));
        if (nl == NULL)
            break;
        if (nl == buf || nl[-1] != '\r')
            goto python_decides; /* a bare LF: the general framing */
        const Py_ssize_t at = nl - buf;
        if (at + 2 < size && nl[1] == '\r' && nl[2] == '\n') {
            const Py_ssize_t end = at - 1; /* the terminator's first byte */
            if (end - start > longest)
                longest = end - start;
            if (count == capacity) {
                Py_ssize_t *grown = PyMem_Malloc((size_t)capacity * 2 * sizeof *grown);
                if (grown == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                memcpy(grown, ends, (size_t)count * sizeof *ends);
                if (ends != ends_stack)
                    PyMem_Free(ends);
                ends = grown;
                capacity *= 2;
            }
            ends[count++] = end;
            start = end + 4;
            p = buf + start;
        } else {
            p = nl + 1;
        }
    }
    /* Near a bound, the reference framing applies the exact rules. */
    if ((count && (longest > max_bytes || longest >= max_fields)) || size - start > max_bytes)
        goto python_decides;

    /* Pass 2: the objects. */
    PyObject *messages = PyList_New(count);
    if (messages == NULL)
        goto done;
    Py_ssize_t others = 0, from = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        const Py_ssize_t len = ends[k] - from;
        PyObject *item;
        if (len >= 7 && memcmp(buf + from, "Event: ", 7) == 0) {
            item = new_event(buf + from, len);
        } else {
            item = PyBytes_FromStringAndSize((const char *)buf + from, len);
            others++;
        }
        if (item == NULL) {
            Py_DECREF(messages);
            goto done;
        }
        PyList_SET_ITEM(messages, k, item);
        from = ends[k] + 4;
    }
    result = Py_BuildValue("(Nnn)", messages, start, others);
    goto done;
python_decides:
    result = Py_NewRef(Py_None);
done:
    if (ends != ends_stack)
        PyMem_Free(ends);
    return result;
}

/* stamp_events(events, server, epoch, last_seq, received_at) -> bool: the session's envelope
 * on every event of one read (event k gets seq last_seq + 1 + k), as AMIClient's dispatch loop
 * sets it. False, with nothing changed, unless every item is an Event of the bound class and
 * the sequence numbers stay within 63 bits (the Python loop then does it). */
static PyObject *stamp_events(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5 || !PyList_Check(args[0]) || !PyLong_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "stamp_events(events: list, server, epoch, last_seq: int, received_at)");
        return NULL;
    }
    if (event_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "stamp_events() before bind_event()");
        return NULL;
    }
    int overflow;
    const long long last = PyLong_AsLongLongAndOverflow(args[3], &overflow);
    if (last == -1 && PyErr_Occurred())
        return NULL;
    /* A snapshot that owns the events: releasing a slot's old value below may run Python
     * (a __del__) that changes the list. */
    PyObject *events = PyList_AsTuple(args[0]);
    if (events == NULL)
        return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(events);
    PyObject *result = Py_False;
    if (overflow || last < 0 || last > LLONG_MAX - n)
        goto done;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (!Py_IS_TYPE(PyTuple_GET_ITEM(events, k), event_type))
            goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *seq = PyLong_FromLongLong(last + 1 + k);
        if (seq == NULL) {
            result = NULL; /* events before k are stamped: the caller treats this as fatal */
            goto done;
        }
        PyObject *event = PyTuple_GET_ITEM(events, k);
        Py_XSETREF(SLOT(event, event_offsets[EV_SERVER]), Py_NewRef(args[1]));
        Py_XSETREF(SLOT(event, event_offsets[EV_EPOCH]), Py_NewRef(args[2]));
        Py_XSETREF(SLOT(event, event_offsets[EV_SEQ]), seq);
        Py_XSETREF(SLOT(event, event_offsets[EV_RECEIVED_AT]), Py_NewRef(args[4]));
    }
    result = Py_True;
done:
    Py_DECREF(events);
    return Py_XNewRef(result);
}

/* Records: Record.of_event and Record.jsons for exactly the bound Record class. */
enum { RC_ID, RC_NAME, RC_SERVER, RC_RECEIVED_AT, RC_JSON, RC_DATA, RC_EVENT, RC_SIZE, RC_RUN,
       RC_SLOTS };
static const char *const record_slot_names[RC_SLOTS] = {
    "_id", "name", "server", "received_at", "_json", "_data", "_event", "size", "_run"};
static PyTypeObject *record_type;
static Py_ssize_t record_offsets[RC_SLOTS];

static PyObject *bind_record(PyObject *module, PyObject *cls) {
    (void)module;
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "bind_record(Record)");
        return NULL;
    }
    Py_ssize_t offsets[RC_SLOTS];
    if (slot_offsets((PyTypeObject *)cls, record_slot_names, RC_SLOTS, offsets) < 0)
        return NULL;
    if (record_type != NULL) {
        if (record_type == (PyTypeObject *)cls)
            Py_RETURN_NONE;
        PyErr_SetString(PyExc_RuntimeError, "bind_record(): already bound to another class");
        return NULL;
    }
    memcpy(record_offsets, offsets, sizeof offsets);
    Py_INCREF(cls);
    Py_XSETREF(record_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

static int records_bound(void) {
    if (event_type == NULL || record_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "amid.ami._speedups: bind_event() and bind_record() first");
        return 0;
    }
    return 1;
}

/* records_of(events, run) -> list[Record] | None: [Record.of_event(e, run) for e in events];
 * None (Python makes them) unless every event is an Event whose slots are all set, with
 * bytes for raw. */
static PyObject *records_of(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "records_of(events, run)");
        return NULL;
    }
    if (!records_bound())
        return NULL;
    /* A snapshot that owns the events (allocating may run the collector, and finalizers). */
    PyObject *events = PySequence_Tuple(args[0]);
    if (events == NULL)
        return NULL;
    PyObject *run = args[1];
    const Py_ssize_t n = PyTuple_GET_SIZE(events);
    PyObject *records = PyList_New(n);
    if (records == NULL) {
        Py_DECREF(events);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *event = PyTuple_GET_ITEM(events, k);
        if (!Py_IS_TYPE(event, event_type))
            goto python_decides;
        PyObject *record = record_type->tp_alloc(record_type, 0);
        if (record == NULL)
            goto error;
        /* The event's slots are checked after the allocation and used before anything else
         * can run Python. */
        PyObject *raw = SLOT(event, event_offsets[EV_RAW]);
        PyObject *name = SLOT(event, event_offsets[EV_NAME]);
        PyObject *server = SLOT(event, event_offsets[EV_SERVER]);
        PyObject *received_at = SLOT(event, event_offsets[EV_RECEIVED_AT]);
        if (raw == NULL || name == NULL || server == NULL || received_at == NULL
                || !PyBytes_CheckExact(raw)) {
            Py_DECREF(record);
            goto python_decides;
        }
        const Py_ssize_t raw_len = PyBytes_GET_SIZE(raw);
        /* records._estimated_size; an int allocation runs no Python */
        PyObject *size = PyLong_FromSsize_t(raw_len + (raw_len >> 2) + 256);
        if (size == NULL) {
            Py_DECREF(record);
            goto error;
        }
        slot_put(record, record_offsets[RC_ID], Py_None);
        slot_put(record, record_offsets[RC_RUN], run);
        slot_put(record, record_offsets[RC_NAME], name);
        slot_put(record, record_offsets[RC_SERVER], server);
        slot_put(record, record_offsets[RC_RECEIVED_AT], received_at);
        slot_put(record, record_offsets[RC_JSON], Py_None);
        slot_put(record, record_offsets[RC_DATA], Py_None);
        slot_put(record, record_offsets[RC_EVENT], event);
        SLOT(record, record_offsets[RC_SIZE]) = size;
        PyObject_GC_UnTrack(record); /* see UNTRACKED */
        PyList_SET_ITEM(records, k, record);
    }
    Py_DECREF(events);
    return records;
python_decides:
    Py_DECREF(records);
    Py_DECREF(events);
    Py_RETURN_NONE;
error:
    Py_DECREF(records);
    Py_DECREF(events);
    return NULL;
}

/* What consecutive records of one batch share: the connection's id and envelope parts, and
 * the receive time (every event of one read has the same). Every reference here is owned. */
typedef struct {
    PyObject *server, *run, *epoch; /* the key of parts */
    PyObject *parts;                /* (head, mid) from Python, or NULL */
    int received_is_float;
    double received_value;          /* the receive time (a float) of ... */
    PyObject *received;             /* ... its ISO bytes */
} BatchParts;

static void batch_parts_clear(BatchParts *shared) {
    Py_CLEAR(shared->server);
    Py_CLEAR(shared->run);
    Py_CLEAR(shared->epoch);
    Py_CLEAR(shared->parts);
    Py_CLEAR(shared->received);
}

/* A plain name's bytes: ASCII with nothing JSON would escape (else NULL: Python decides). */
static const unsigned char *plain_name(PyObject *name, Py_ssize_t *len) {
    if (!PyUnicode_CheckExact(name) || !PyUnicode_IS_ASCII(name))
        return NULL;
    const unsigned char *text = PyUnicode_DATA(name);
    const Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    for (Py_ssize_t k = 0; k < n; k++) {
        if (text[k] < 0x20 || text[k] == '"' || text[k] == '\\' || text[k] == 0x7f)
            return NULL;
    }
    *len = n;
    return text;
}

/* The record JSON of a fresh wire record, as records.Record.json would make it; Py_None
 * (a new reference) when Python must (anything unusual), NULL on error. */
static PyObject *fresh_record_json(PyObject *event, PyObject *run, BatchParts *shared,
                                   PyObject *parts_for, PyObject *iso_bytes) {
    /* The callbacks below run Python, which could rebind the event's slots: hold them. */
    enum { SERVER, EPOCH, SEQ, RECEIVED_AT, NAME, RAW, HELD };
    static const int which[HELD] = {EV_SERVER, EV_EPOCH, EV_SEQ, EV_RECEIVED_AT, EV_NAME, EV_RAW};
    PyObject *held[HELD];
    for (int k = 0; k < HELD; k++) {
        held[k] = SLOT(event, event_offsets[which[k]]);
        if (held[k] == NULL) /* unset: the property raises AttributeError, as Python does */
            Py_RETURN_NONE;
    }
    for (int k = 0; k < HELD; k++)
        Py_INCREF(held[k]);
    PyObject *result = NULL;
    PyObject *server = held[SERVER], *epoch = held[EPOCH], *received_at = held[RECEIVED_AT];
    if (!PyLong_CheckExact(epoch) || !PyLong_CheckExact(held[SEQ]) || !PyBytes_Check(held[RAW]))
        goto python_decides;
    Py_ssize_t name_len;
    const unsigned char *name_text = plain_name(held[NAME], &name_len);
    if (name_text == NULL)
        goto python_decides;
    int overflow;
    const long long seq = PyLong_AsLongLongAndOverflow(held[SEQ], &overflow);
    if (overflow)
        goto python_decides;
    if (server != shared->server || run != shared->run || epoch != shared->epoch) {
        int same = shared->parts != NULL && server == shared->server && run == shared->run;
        if (same) {
            same = PyObject_RichCompareBool(epoch, shared->epoch, Py_EQ);
            if (same < 0)
                goto done;
        }
        if (!same) {
            PyObject *parts = PyObject_CallFunctionObjArgs(parts_for, server, run, epoch, NULL);
            if (parts == NULL)
                goto done;
            if (parts != Py_None && (!PyTuple_CheckExact(parts) || PyTuple_GET_SIZE(parts) != 2
                    || !PyBytes_Check(PyTuple_GET_ITEM(parts, 0))
                    || !PyBytes_Check(PyTuple_GET_ITEM(parts, 1)))) {
                Py_DECREF(parts);
                PyErr_SetString(PyExc_TypeError, "parts_for() must give (head, mid) or None");
                goto done;
            }
            if (parts == Py_None)
                Py_CLEAR(parts);
            Py_XSETREF(shared->parts, parts);
        }
        Py_XSETREF(shared->server, Py_NewRef(server));
        Py_XSETREF(shared->run, Py_NewRef(run));
        Py_XSETREF(shared->epoch, Py_NewRef(epoch));
    }
    if (shared->parts == NULL)
        goto python_decides;
    /* A receive time that is not a float (set by a library user) is formatted every time. */
    const int is_float = PyFloat_CheckExact(received_at);
    if (shared->received == NULL || !is_float || !shared->received_is_float
            || PyFloat_AS_DOUBLE(received_at) != shared->received_value) {
        PyObject *received = PyObject_CallOneArg(iso_bytes, received_at);
        if (received == NULL)
            goto done;
        if (!PyBytes_Check(received)) {
            Py_DECREF(received);
            PyErr_SetString(PyExc_TypeError, "iso_bytes() must give bytes");
            goto done;
        }
        Py_XSETREF(shared->received, received);
        shared->received_is_float = is_float;
        shared->received_value = is_float ? PyFloat_AS_DOUBLE(received_at) : 0.0;
    }
    /* From here on nothing runs Python. */
    const unsigned char *raw_bytes = (const unsigned char *)PyBytes_AS_STRING(held[RAW]);
    Scan scan;
    if (scan_fields(raw_bytes, PyBytes_GET_SIZE(held[RAW]), &scan) != SCAN_OK)
        goto python_decides;
    char seq_text[24];
    const int seq_len = format_int(seq_text, seq);
    PyObject *head = PyTuple_GET_ITEM(shared->parts, 0), *mid = PyTuple_GET_ITEM(shared->parts, 1);
    result = build_record((const unsigned char *)PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head),
                          (const unsigned char *)PyBytes_AS_STRING(mid), PyBytes_GET_SIZE(mid),
                          seq_text, seq_len, 1,
                          (const unsigned char *)PyBytes_AS_STRING(shared->received),
                          PyBytes_GET_SIZE(shared->received), name_text, name_len, raw_bytes, &scan);
    goto done;
python_decides:
    result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < HELD; k++)
        Py_DECREF(held[k]);
    return result;
}

/* records_json(records, parts_for, iso_bytes) -> list[bytes] | None: [r.json for r in records],
 * the fresh wire records built here and kept in their _json slot; any other record asks its
 * own json property. None (Python does it all) unless every item is a bound Record.
 * parts_for(server, run, epoch) gives (head, mid) as record_json() takes them, or None. */
static PyObject *records_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "records_json(records, parts_for, iso_bytes)");
        return NULL;
    }
    if (!records_bound())
        return NULL;
    /* A snapshot that owns the records: the callbacks run Python, which may change the list. */
    PyObject *records = PySequence_Tuple(args[0]);
    if (records == NULL)
        return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(records);
    PyObject *out = NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (!Py_IS_TYPE(PyTuple_GET_ITEM(records, k), record_type)) {
            out = Py_NewRef(Py_None);
            goto done;
        }
    }
    out = PyList_New(n);
    if (out == NULL)
        goto done;
    BatchParts shared = {NULL, NULL, NULL, NULL, 0, 0.0, NULL};
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *record = PyTuple_GET_ITEM(records, k);
        PyObject *json = SLOT(record, record_offsets[RC_JSON]);
        if (json != NULL && json != Py_None) {
            PyList_SET_ITEM(out, k, Py_NewRef(json));
            continue;
        }
        PyObject *event = SLOT(record, record_offsets[RC_EVENT]);
        PyObject *run = SLOT(record, record_offsets[RC_RUN]);
        PyObject *built = NULL;
        if (json != NULL && event != NULL && Py_IS_TYPE(event, event_type) && run != NULL
                && SLOT(record, record_offsets[RC_ID]) == Py_None && PyUnicode_CheckExact(run)) {
            Py_INCREF(event);
            Py_INCREF(run);
            built = fresh_record_json(event, run, &shared, args[1], args[2]);
            Py_DECREF(event);
            Py_DECREF(run);
            if (built == NULL)
                break;
        }
        if (built == NULL || built == Py_None) {
            Py_XDECREF(built);
            built = PyObject_GetAttrString(record, "json"); /* the property: Python's rules */
            if (built == NULL)
                break;
        } else {
            Py_XSETREF(SLOT(record, record_offsets[RC_JSON]), Py_NewRef(built));
        }
        PyList_SET_ITEM(out, k, built);
    }
    batch_parts_clear(&shared);
    if (PyErr_Occurred())
        Py_CLEAR(out);
done:
    Py_DECREF(records);
    return out;
}

/* ------------------------------------------------------------------ decoded fields
 *
 * parse_fields(raw) -> list[tuple[str, str]] | None: Message.fields for the usual message,
 * ASCII "Key: Value" lines joined by CRLF, each key ending at the line's first colon, which
 * a space follows (the value is the rest of the line, ": " included). Anything else (a
 * non-ASCII byte, a bare LF, a line without ": " after its key) is None: amid.ami.protocol's
 * _parse_fields decodes it, and gives the same pairs for what this takes (tests compare). */

static inline uint64_t field_specials(uint64_t x) {
    return has_zero_byte(x ^ (ONES * ':')) | has_zero_byte(x ^ (ONES * '\r'))
        | has_zero_byte(x ^ (ONES * '\n')) | (x & HIGHS);
}

/* The first ':', CR, LF or non-ASCII byte at or after i (the NUL at raw[size] if none). */
static inline Py_ssize_t skip_field_text(const unsigned char *raw, Py_ssize_t i, Py_ssize_t size) {
    while (i + 8 <= size) {
        const uint64_t mask = field_specials(load_le64(raw + i));
        if (mask)
            return i + (__builtin_ctzll(mask) >> 3);
        i += 8;
    }
    while (i < size && raw[i] != ':' && raw[i] != '\r' && raw[i] != '\n' && raw[i] < 0x80)
        i++;
    return i;
}

#define KEY_SLOTS 512
static PyObject *key_cache[KEY_SLOTS];

static PyObject *parse_fields(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyBytes_CheckExact(arg))
        Py_RETURN_NONE;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(arg);
    const Py_ssize_t size = PyBytes_GET_SIZE(arg);
    if (size == 0)
        Py_RETURN_NONE;
    PyObject *fields = PyList_New(0);
    if (fields == NULL)
        return NULL;
    Py_ssize_t i = 0;
    while (1) {
        const Py_ssize_t key_start = i;
        /* the key: up to the first colon (a lone CR is text; LF, CRLF or the end is not) */
        while (1) {
            i = skip_field_text(raw, i, size);
            if (i < size && raw[i] == '\r' && !(i + 1 < size && raw[i + 1] == '\n')) {
                i++;
                continue;
            }
            break;
        }
        if (i >= size || raw[i] != ':' || i + 1 >= size || raw[i + 1] != ' ')
            goto python_decides;
        const Py_ssize_t key_end = i;
        i += 2;
        /* the value: the rest of the line, up to CRLF or the end */
        while (1) {
            i = skip_field_text(raw, i, size);
            if (i >= size)
                break;
            if (raw[i] == ':' || (raw[i] == '\r' && !(i + 1 < size && raw[i + 1] == '\n'))) {
                i++;
                continue;
            }
            if (raw[i] == '\r')
                break; /* CRLF */
            goto python_decides; /* a bare LF or a non-ASCII byte */
        }
        PyObject *pair = PyTuple_New(2);
        PyObject *key = pair == NULL ? NULL
            : shared_text(key_cache, KEY_SLOTS, raw + key_start, key_end - key_start, 1);
        PyObject *value = key == NULL ? NULL : ascii_text(raw + key_end + 2, i - key_end - 2);
        if (value == NULL) {
            Py_XDECREF(key);
            Py_XDECREF(pair);
            Py_DECREF(fields);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, key);
        PyTuple_SET_ITEM(pair, 1, value);
        PyObject_GC_UnTrack(pair); /* two strs: what the collector would find out itself */
        if (PyList_Append(fields, pair) < 0) {
            Py_DECREF(pair);
            Py_DECREF(fields);
            return NULL;
        }
        Py_DECREF(pair);
        if (i >= size)
            return fields;
        i += 2; /* past CRLF: the next line (an empty last line has no colon: Python's) */
    }
python_decides:
    Py_DECREF(fields);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"record_json", (PyCFunction)(void (*)(void))record_json, METH_FASTCALL,
     "record_json(head, mid, seq, received_at, name, raw, seq_in_id=True) -> bytes | None\n\n"
     "A whole record JSON in one pass; see amid._encode.record_json."},
    {"parse_fields", parse_fields, METH_O,
     "parse_fields(raw: bytes) -> list[tuple[str, str]] | None\n\n"
     "Message.fields of a plain ASCII message; see amid.ami.protocol._parse_fields."},
    {"bind_event", (PyCFunction)(void (*)(void))bind_event, METH_FASTCALL,
     "bind_event(Event, template) -> None\n\nThe class frame_crlf() makes, and its defaults."},
    {"frame_crlf", (PyCFunction)(void (*)(void))frame_crlf, METH_FASTCALL,
     "frame_crlf(buf, max_message_bytes, max_fields) -> (messages, consumed, others) | None\n\n"
     "Parser._feed_general in C for CRLF streams; see amid.ami.protocol."},
    {"stamp_events", (PyCFunction)(void (*)(void))stamp_events, METH_FASTCALL,
     "stamp_events(events, server, epoch, last_seq, received_at) -> bool\n\n"
     "The session's envelope on one read's events; see amid.ami.session."},
    {"bind_record", bind_record, METH_O,
     "bind_record(Record) -> None\n\nThe class records_of() makes and records_json() reads."},
    {"records_of", (PyCFunction)(void (*)(void))records_of, METH_FASTCALL,
     "records_of(events, run) -> list | None\n\n[Record.of_event(e, run) for e in events]."},
    {"records_json", (PyCFunction)(void (*)(void))records_json, METH_FASTCALL,
     "records_json(records, parts_for, iso_bytes) -> list | None\n\n[r.json for r in records]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "amid.ami._speedups",
    "The read path's hot loops in C (optional; same output; see amid.ami._accel).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    init_byte_class();
    return PyModule_Create(&module_def);
}
