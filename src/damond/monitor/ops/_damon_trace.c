/*
 * damond.monitor.ops._damon_trace: the records of one trace event in ring buffer pages,
 * natively.
 *
 * damon_trace.py's parse_pages is the reference: this module gives the same
 * times and records for the same pages, in one call for a whole read, where
 * the Python path spends a dozen numpy calls and a Python step per run of
 * records (under TCG in the test guest a numpy call costs tens of µs).
 *
 *   parse(pages, event_id, type_len, data_offset) -> (times, rows, count, missed)
 *     pages: a list of bytes read from trace_pipe_raw; event_id, type_len: the
 *     event's id (the low 16 bits of a record's first word) and its records'
 *     length in words (1..28: the type_len of their headers); data_offset:
 *     where a page's data starts (events/header_page). times: count uint64
 *     trace clock times, rows: count rows of type_len uint32 words (a record
 *     without its header), both as bytearrays in the host's byte order;
 *     missed: a page said the kernel dropped events before it.
 *
 * A page (kernel/trace/ring_buffer.c): u64 timestamp, a commit word (data
 * bytes; bit 31: events were lost), then entries, each a u32 header (type_len:
 * 5 bits, time delta: 27 bits): type_len 1..28 a record of type_len words,
 * 0 a record whose length is the next word, 29 padding (delta 0: the rest of
 * the page), 30 a time extend, 31 an absolute time stamp (both 8 bytes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define PADDING 29
#define TIME_EXTEND 30
#define TIME_STAMP 31
#define TS_SHIFT 27
#define TS_MSB (0xF8ULL << 56)
#define MAX_SMALL_WORDS 28
#define MISSED_EVENTS (1ULL << 31)
#define COMMIT_SIZE_MASK ((1ULL << 30) - 1)

typedef struct {
    uint64_t *times;
    uint32_t *rows;
    Py_ssize_t count;
} Found;

static uint32_t word_at(const unsigned char *page, uint64_t pos)
{
    uint32_t w;
    memcpy(&w, page + pos, 4);
    return w;
}

/* damon_trace._absolute: an absolute time stamp leaves out the top bits (rb_fix_abs_ts). */
static uint64_t absolute(uint64_t stamp, uint64_t previous)
{
    if (previous & TS_MSB) {
        stamp |= previous & TS_MSB;
        if (stamp < previous)
            stamp += 1ULL << 59;
    }
    return stamp;
}

/* The event's records of one page appended to found (which has room for them all);
 * returns whether the page says events were lost before it. */
static int walk(const unsigned char *page, Py_ssize_t size, uint32_t event_id, uint32_t type_len,
                uint64_t data_offset, Found *found)
{
    uint64_t ts, commit;
    memcpy(&ts, page, 8);
    memcpy(&commit, page + 8, 8);
    uint64_t pos = data_offset;
    uint64_t end = pos + (commit & COMMIT_SIZE_MASK);
    if (end > (uint64_t)size)
        end = (uint64_t)size;
    uint64_t length = (uint64_t)type_len * 4 + 4;
    while (pos + 4 <= end) {
        uint32_t header = word_at(page, pos);
        uint32_t kind = header & 31, delta = header >> 5;
        uint64_t step;
        if (kind == PADDING) {
            if (delta == 0 || pos + 8 > end)
                break; /* the rest of the page is padding */
            step = (uint64_t)word_at(page, pos + 4) + 4;
        } else if (kind == TIME_EXTEND || kind == TIME_STAMP) {
            if (pos + 8 > end)
                break;
            uint64_t time = ((uint64_t)word_at(page, pos + 4) << TS_SHIFT) + delta;
            ts = kind == TIME_STAMP ? absolute(time, ts) : ts + time;
            step = 8;
        } else {
            if (kind)
                step = (uint64_t)kind * 4 + 4;
            else if (pos + 8 <= end)
                step = (uint64_t)word_at(page, pos + 4) + 4;
            else
                break;
            if (step < 8 || pos + step > end)
                break; /* a torn record: never in a committed page */
            ts += delta;
            if (kind == type_len && pos + length <= end &&
                (word_at(page, pos + 4) & 0xFFFF) == event_id) {
                found->times[found->count] = ts;
                memcpy(found->rows + found->count * type_len, page + pos + 4, type_len * 4);
                found->count++;
            }
        }
        pos += step;
    }
    return (commit & MISSED_EVENTS) != 0;
}

static PyObject *parse(PyObject *self, PyObject *args)
{
    PyObject *pages;
    unsigned int event_id, type_len;
    unsigned long long data_offset;
    if (!PyArg_ParseTuple(args, "O!IIK", &PyList_Type, &pages, &event_id, &type_len,
                          &data_offset))
        return NULL;
    if (type_len < 1 || type_len > MAX_SMALL_WORDS) {
        PyErr_Format(PyExc_ValueError, "type_len %u: records of 1 to %d words only", type_len,
                     MAX_SMALL_WORDS);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(pages), room = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *page = PyList_GET_ITEM(pages, i);
        if (!PyBytes_Check(page)) {
            PyErr_SetString(PyExc_TypeError, "pages must be bytes");
            return NULL;
        }
        if (PyBytes_GET_SIZE(page) < 16) {
            PyErr_Format(PyExc_ValueError, "a page of %zd bytes: shorter than its header",
                         PyBytes_GET_SIZE(page));
            return NULL;
        }
        room += PyBytes_GET_SIZE(page) / ((Py_ssize_t)type_len * 4 + 4);
    }
    PyObject *times = PyByteArray_FromStringAndSize(NULL, room * 8);
    PyObject *rows = PyByteArray_FromStringAndSize(NULL, room * type_len * 4);
    if (times == NULL || rows == NULL) {
        Py_XDECREF(times);
        Py_XDECREF(rows);
        return NULL;
    }
    Found found = {(uint64_t *)PyByteArray_AS_STRING(times),
                   (uint32_t *)PyByteArray_AS_STRING(rows), 0};
    int missed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *page = PyList_GET_ITEM(pages, i);
        missed |= walk((const unsigned char *)PyBytes_AS_STRING(page), PyBytes_GET_SIZE(page),
                       event_id, type_len, data_offset, &found);
    }
    if (PyByteArray_Resize(times, found.count * 8) < 0 ||
        PyByteArray_Resize(rows, found.count * type_len * 4) < 0) {
        Py_DECREF(times);
        Py_DECREF(rows);
        return NULL;
    }
    return Py_BuildValue("(NNnO)", times, rows, found.count, missed ? Py_True : Py_False);
}

#define PARSE_DOC                                                                          \
    "parse(pages, event_id, type_len, data_offset) -> (times, rows, count, missed): the "   \
    "event's records in ring buffer pages, as uint64 times and rows of uint32 words."
#define MODULE_DOC                                                                         \
    "An event's records in trace ring buffer pages in one call (damon_trace.py's "         \
    "parse_pages is the reference)."

static PyMethodDef methods[] = {{"parse", parse, METH_VARARGS, PARSE_DOC}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_damon_trace", MODULE_DOC, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__damon_trace(void)
{
    return PyModule_Create(&module);
}
