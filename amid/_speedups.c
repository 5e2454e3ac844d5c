/* amid._speedups: the record JSON's hot loop in C (optional; amid._encode has the same rules in
 * pure Python and uses them when this module is not built).
 *
 * fields_json(raw) turns one AMI message ("Key: Value" lines joined by CRLF, the terminator
 * already removed by the framing) into the JSON object of its fields, {"Key":"Value",...},
 * in one pass over the bytes. It takes only the plain common case; for anything else it returns
 * False where the Python fast path would refuse the message too (so the caller goes straight
 * to the general path), None where only Python can tell (a non-ASCII byte, more than
 * MAX_LINES lines). It takes:
 *   - every line is <key>": "<value>: the key ends at the line's first colon, which a space
 *     follows (the value is the rest of the line, ": " included);
 *   - lines are separated by CRLF only (no bare CR or LF);
 *   - ASCII only, no control character, no DEL, no backslash ('"' gets a backslash);
 *   - a repeated key becomes a JSON array of its values, at its first line (as
 *     Message.to_dict() has it);
 *   - at most MAX_LINES lines.
 * For every message it accepts, the result is byte for byte what amid._encode's general path
 * (Message.to_dict() and pydantic_core.to_json) gives, and what its Python fast path gives
 * where that takes the message (tests/test_speedups.py checks both, with hypothesis).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static inline uint64_t special_bytes(uint64_t x) {
    return ((x - ONES * 0x20) & ~x & HIGHS)  /* below 0x20: controls, CR, LF */
        | (x & HIGHS)                          /* non-ASCII */
        | has_zero_byte(x ^ (ONES * 0x7f))     /* DEL */
        | has_zero_byte(x ^ (ONES * '"'))
        | has_zero_byte(x ^ (ONES * '\\'))
        | has_zero_byte(x ^ (ONES * ':'));
}

static inline uint64_t load_le64(const unsigned char *p) {
    uint64_t x;
    memcpy(&x, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap64(x);
#endif
    return x;
}

/* The first byte at or after i that is not PLAIN (the NUL at raw[size] if none is). */
static inline Py_ssize_t skip_plain(const unsigned char *raw, Py_ssize_t i, Py_ssize_t size) {
    while (i + 8 <= size) {
        const uint64_t mask = special_bytes(load_le64(raw + i));
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

enum { SCAN_OK = 1, SCAN_REFUSED = 0, SCAN_UNSURE = -1 };

/* Pass 1: check the rules, note where each key and value is, count the quotes, group the
 * repeated keys. CPython keeps a NUL after a bytes object's data: a REFUSED byte that stops
 * every scan loop at the end without a bounds check in the loop. */
static int scan_fields(const unsigned char *raw, Py_ssize_t size, Scan *scan) {
    if (size == 0)
        return SCAN_REFUSED;
    if (size > (Py_ssize_t)UINT32_MAX)
        return SCAN_UNSURE; /* the per-line quote counts are 32 bits: Python takes these */
    int lines = 0;
    Py_ssize_t quotes = 0;
    Py_ssize_t i = 0;
    while (1) {
        if (lines == MAX_LINES)
            return SCAN_UNSURE;
        /* the key: up to the first colon, which a space must follow */
        scan->key_start[lines] = i;
        uint32_t key_quotes = 0, value_quotes = 0;
        while (1) {
            i = skip_plain(raw, i, size);
            const unsigned char c = byte_class[raw[i]];
            if (c == COLON)
                break;
            if (c == QUOTE) {
                key_quotes++;
                i++;
                continue;
            }
            if (c == NON_ASCII)
                return SCAN_UNSURE;
            return SCAN_REFUSED; /* the end, or CR/LF (a line without a colon), a control char, '\\' */
        }
        if (i + 1 >= size || raw[i + 1] != ' ')
            return SCAN_REFUSED;
        scan->key_end[lines] = i;
        i += 2;
        /* the value: the rest of the line, up to CRLF or the end (colons are plain there) */
        while (1) {
            i = skip_plain(raw, i, size);
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
                return SCAN_UNSURE;
            return SCAN_REFUSED;
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

static PyObject *scan_refusal(int status) {
    if (status == SCAN_UNSURE)
        Py_RETURN_NONE;
    Py_RETURN_FALSE;
}

static PyObject *fields_json(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "fields_json() expects bytes");
        return NULL;
    }
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(arg);
    Scan scan;
    const int status = scan_fields(raw, PyBytes_GET_SIZE(arg), &scan);
    if (status != SCAN_OK)
        return scan_refusal(status);
    PyObject *result = PyBytes_FromStringAndSize(NULL, scan.json_size);
    if (result == NULL)
        return NULL;
    unsigned char *const first = (unsigned char *)PyBytes_AS_STRING(result);
    if (write_fields(first, raw, &scan) - first != scan.json_size) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_SystemError, "amid._speedups.fields_json: size mismatch");
        return NULL;
    }
    return result;
}

static const char RECEIVED_AT[] = ",\"received_at\":\"";
static const char EVENT[] = "\",\"event\":\"";
static const char FIELDS[] = "\",\"fields\":";

/* record_json(head, mid, seq, received_at, name, raw): the whole record JSON in one buffer,
 *   head + seq + mid + seq + ',"received_at":"' + received_at + '","event":"' + name
 *   + '","fields":' + fields_json(raw) + '}'
 * where head is '{"id":"<server>:<run>:<epoch>:' and mid '","server":"<server>","epoch":<epoch>,"seq":'
 * (amid._encode builds them once per connection, escaped). False / None as for fields_json. */
static PyObject *record_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) || !PyLong_Check(args[2])
            || !PyBytes_Check(args[3]) || !PyBytes_Check(args[4]) || !PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError,
                        "record_json(head: bytes, mid: bytes, seq: int, received_at: bytes, "
                        "name: bytes, raw: bytes)");
        return NULL;
    }
    const long long seq = PyLong_AsLongLong(args[2]);
    if (seq == -1 && PyErr_Occurred()) {
        PyErr_Clear(); /* beyond 64 bits: Python formats it */
        Py_RETURN_NONE;
    }
    char seq_text[24];
    const int seq_len = snprintf(seq_text, sizeof seq_text, "%lld", seq);
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(args[5]);
    Scan scan;
    const int status = scan_fields(raw, PyBytes_GET_SIZE(args[5]), &scan);
    if (status != SCAN_OK)
        return scan_refusal(status);
    const Py_ssize_t head_len = PyBytes_GET_SIZE(args[0]), mid_len = PyBytes_GET_SIZE(args[1]);
    const Py_ssize_t received_len = PyBytes_GET_SIZE(args[3]), name_len = PyBytes_GET_SIZE(args[4]);
    const Py_ssize_t total = head_len + seq_len + mid_len + seq_len
        + (Py_ssize_t)(sizeof RECEIVED_AT - 1) + received_len + (Py_ssize_t)(sizeof EVENT - 1)
        + name_len + (Py_ssize_t)(sizeof FIELDS - 1) + scan.json_size + 1;
    PyObject *result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        return NULL;
    unsigned char *const first = (unsigned char *)PyBytes_AS_STRING(result);
    unsigned char *out = first;
#define PUT(data, len) do { memcpy(out, (data), (size_t)(len)); out += (len); } while (0)
    PUT(PyBytes_AS_STRING(args[0]), head_len);
    PUT(seq_text, seq_len);
    PUT(PyBytes_AS_STRING(args[1]), mid_len);
    PUT(seq_text, seq_len);
    PUT(RECEIVED_AT, sizeof RECEIVED_AT - 1);
    PUT(PyBytes_AS_STRING(args[3]), received_len);
    PUT(EVENT, sizeof EVENT - 1);
    PUT(PyBytes_AS_STRING(args[4]), name_len);
    PUT(FIELDS, sizeof FIELDS - 1);
#undef PUT
    out = write_fields(out, raw, &scan);
    *out++ = '}';
    if (out - first != total) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_SystemError, "amid._speedups.record_json: size mismatch");
        return NULL;
    }
    return result;
}

static PyMethodDef methods[] = {
    {"fields_json", fields_json, METH_O,
     "fields_json(raw: bytes) -> bytes | bool | None\n\n"
     "The JSON object of a plain AMI message's fields; False when the message needs the\n"
     "general path; None when the Python fast path must decide (see amid._encode)."},
    {"record_json", (PyCFunction)(void (*)(void))record_json, METH_FASTCALL,
     "record_json(head, mid, seq, received_at, name, raw) -> bytes | bool | None\n\n"
     "A whole record JSON around fields_json(raw); see amid._encode.record_json."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "amid._speedups",
    "C version of amid._encode's fields fast path (optional; same output).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    init_byte_class();
    return PyModule_Create(&module_def);
}
