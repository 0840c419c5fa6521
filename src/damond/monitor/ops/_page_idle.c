/*
 * damond.monitor.ops._page_idle: one sample of the page_idle access check, natively.
 *
 * page_idle.py is the reference: this module does exactly what its Python path
 * does (PageIdleAccess with native=False), for all sampled addresses of one
 * target in one call, so that a sample costs a handful of Python calls instead
 * of several dozen numpy calls and a Python loop step per region.
 *
 *   prepare(addrs, heads, pagemap_fd, kpageflags_fd, bitmap_fd, tails,
 *           pagemap_gap, kpageflags_gap, write_gap) -> int
 *     addrs: uint64 sampling addresses (virtual, or physical when pagemap_fd
 *     is -1); heads: a writable uint64 array of the same length, filled with
 *     the PFN whose idle bit stands for each address (its folio's head), or
 *     NO_HEAD where page_idle cannot tell (no page, not on an LRU list, no
 *     head found); tails: the dict of learned tail spans (head -> last tail,
 *     page_idle.HeadCache). Marks the heads idle. Returns how many addresses'
 *     pagemap entries were read (0: the fd holds an old address space, and
 *     nothing was marked), the number of addresses for physical ones, or
 *     PFN_HIDDEN when a present page shows no PFN (no CAP_SYS_ADMIN).
 *
 *   check(heads, accessed, bitmap_fd, read_gap) -> None
 *     accessed: a writable array of bytes (numpy bool) of the same length:
 *     1 where the head is trackable and no longer idle.
 *
 * Reads and writes go to the kernel in runs, as page_idle.py's Layout does:
 * sorted unique positions share one pread/pwrite while they are at most
 * *_gap entries apart. The GIL is released around kernel I/O, except while
 * tails are walked (they use the dict).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ENTRY 8
#define WORD_PAGES 64
#define ALL_ONES UINT64_MAX
#define NO_HEAD UINT64_MAX
#define PFN_HIDDEN (-2)

#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)
#define KPF_LRU (1ULL << 5)
#define KPF_COMPOUND_HEAD (1ULL << 15)
#define KPF_COMPOUND_TAIL (1ULL << 16)
#define KPF_NOPAGE (1ULL << 20)

static uint64_t kernel_page;  /* sysconf(_SC_PAGESIZE) */
static uint64_t folio_block;  /* pages per PMD-sized block: kernel_page / ENTRY */

/* One position (file entry or bitmap word) and the input index it serves. */
typedef struct {
    uint64_t key;
    uint64_t value; /* what was read for it, or the bits to write */
    Py_ssize_t index;
} Item;

typedef struct {
    Item *items;
    Py_ssize_t n;
    uint64_t *run;      /* scratch for one run's entries */
    Py_ssize_t run_cap;
    int err;            /* errno of a failed syscall, 0 if none */
} Work;

static int by_key(const void *a, const void *b)
{
    uint64_t x = ((const Item *)a)->key, y = ((const Item *)b)->key;
    return (x > y) - (x < y);
}

static void sort_items(Item *items, Py_ssize_t n)
{
    for (Py_ssize_t i = 1; i < n; i++) {
        if (items[i].key < items[i - 1].key) {
            qsort(items, (size_t)n, sizeof(Item), by_key);
            return;
        }
    }
}

static int grow_run(Work *w, Py_ssize_t count)
{
    if (count <= w->run_cap)
        return 0;
    uint64_t *run = PyMem_RawRealloc(w->run, (size_t)count * ENTRY);
    if (run == NULL) {
        w->err = ENOMEM;
        return -1;
    }
    w->run = run;
    w->run_cap = count;
    return 0;
}

/*
 * pread (or pwrite) count entries at entry offset first, on until the end of the
 * file: sysfs moves at most a page per call, and the kernel takes nothing of a
 * last, partial bitmap word. Returns the entries moved, or -1 (w->err set).
 */
static Py_ssize_t transfer(Work *w, int fd, uint64_t *buf, Py_ssize_t count, uint64_t first,
                           int writing)
{
    size_t size = (size_t)count * ENTRY, done = 0;
    char *p = (char *)buf;
    while (done < size) {
        off_t offset = (off_t)(first * ENTRY + done);
        ssize_t moved = writing ? pwrite(fd, p + done, size - done, offset)
                                : pread(fd, p + done, size - done, offset);
        if (moved < 0) {
            if (errno == EINTR)
                continue;
            w->err = errno;
            return -1;
        }
        if (moved == 0)
            break;
        done += (size_t)moved;
    }
    return (Py_ssize_t)(done / ENTRY);
}

/* Read count entries at entry offset first into buf; entries past the end of the
 * file read as fill. Returns the entries really read, or -1. */
static Py_ssize_t read_full(Work *w, int fd, uint64_t *buf, Py_ssize_t count, uint64_t first,
                            uint64_t fill)
{
    Py_ssize_t read = transfer(w, fd, buf, count, first, 0);
    for (Py_ssize_t i = read < 0 ? count : read; i < count; i++)
        buf[i] = fill;
    return read;
}

/* Where the run starting at item i ends (exclusive): sorted items at most max_gap
 * entries apart share one run, read or written by one call; *count is its length
 * in entries (the gaps included), made room for in w->run. -1 on ENOMEM. */
static Py_ssize_t run_end(Work *w, const Item *items, Py_ssize_t i, Py_ssize_t n,
                          uint64_t max_gap, Py_ssize_t *count)
{
    Py_ssize_t j = i + 1;
    while (j < n && items[j].key - items[j - 1].key <= max_gap + 1)
        j++;
    *count = (Py_ssize_t)(items[j - 1].key - items[i].key + 1);
    return grow_run(w, *count) < 0 ? -1 : j;
}

/*
 * Fill items[i].value with the entry at items[i].key of an array file; items
 * sorted by key (repeats allowed). Returns how many items got an entry read
 * from the file (not filled), or -1.
 */
static Py_ssize_t read_items(Work *w, int fd, Item *items, Py_ssize_t n, uint64_t max_gap,
                             uint64_t fill)
{
    Py_ssize_t read = 0, i = 0, count;
    while (i < n) {
        Py_ssize_t j = run_end(w, items, i, n, max_gap, &count);
        if (j < 0)
            return -1;
        uint64_t first = items[i].key;
        Py_ssize_t got = read_full(w, fd, w->run, count, first, fill);
        if (got < 0)
            return -1;
        for (Py_ssize_t k = i; k < j; k++) {
            uint64_t offset = items[k].key - first;
            items[k].value = w->run[offset];
            if ((Py_ssize_t)offset < got)
                read++;
        }
        i = j;
    }
    return read;
}

/* Write the OR of the values of equal keys at each key (sorted); close keys share
 * one pwrite, zero words in between. */
static int write_items(Work *w, int fd, const Item *items, Py_ssize_t n, uint64_t max_gap)
{
    Py_ssize_t i = 0, count;
    while (i < n) {
        Py_ssize_t j = run_end(w, items, i, n, max_gap, &count);
        if (j < 0)
            return -1;
        uint64_t first = items[i].key;
        memset(w->run, 0, (size_t)count * ENTRY);
        for (Py_ssize_t k = i; k < j; k++)
            w->run[items[k].key - first] |= items[k].value;
        if (transfer(w, fd, w->run, count, first, 1) < 0)
            return -1;
        i = j;
    }
    return 0;
}

/* -- tails and their heads (page_idle.py's HeadCache and find_head) ------------------------ */

static int cache_get(PyObject *tails, uint64_t head, uint64_t *last, int *found)
{
    PyObject *key = PyLong_FromUnsignedLongLong(head);
    if (key == NULL)
        return -1;
    PyObject *value = PyDict_GetItemWithError(tails, key);
    Py_DECREF(key);
    if (value == NULL) {
        *found = 0;
        return PyErr_Occurred() ? -1 : 0;
    }
    *last = PyLong_AsUnsignedLongLong(value);
    if (*last == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *found = 1;
    return 0;
}

static int cache_learn(PyObject *tails, uint64_t head, uint64_t last)
{
    uint64_t known;
    int found;
    if (cache_get(tails, head, &known, &found) < 0)
        return -1;
    if (found && known > last)
        last = known;
    PyObject *key = PyLong_FromUnsignedLongLong(head);
    PyObject *value = PyLong_FromUnsignedLongLong(last);
    int rc = (key && value) ? PyDict_SetItem(tails, key, value) : -1;
    Py_XDECREF(key);
    Py_XDECREF(value);
    return rc;
}

/* The nearest cached head that may hold pfn: its candidates are pfn rounded down to
 * each folio order, nearest first. */
static int cache_nearest(PyObject *tails, uint64_t pfn, uint64_t *head, uint64_t *last, int *found)
{
    uint64_t previous = pfn;
    *found = 0;
    for (uint64_t size = 2; size <= folio_block; size *= 2) {
        uint64_t candidate = pfn & ~(size - 1);
        if (candidate == pfn || candidate == previous)
            continue;
        previous = candidate;
        if (cache_get(tails, candidate, last, found) < 0)
            return -1;
        if (*found) {
            *head = candidate;
            return 0;
        }
    }
    return 0;
}

/* The head PFN of the tail page pfn, or NO_HEAD; -1 on error (Python error or w->err). */
static int find_head(Work *w, int kpageflags, PyObject *tails, uint64_t pfn, uint64_t *out)
{
    uint64_t known_head = 0, known_last = 0;
    int known;
    *out = NO_HEAD;
    if (cache_nearest(tails, pfn, &known_head, &known_last, &known) < 0)
        return -1;
    if (known && pfn <= known_last) {
        *out = known_head;
        return 0;
    }
    uint64_t first = known ? known_last + 1 : pfn & ~(folio_block - 1);
    Py_ssize_t count = (Py_ssize_t)(pfn - first);
    if (grow_run(w, count ? count : 1) < 0)
        return -1;
    Py_ssize_t got = read_full(w, kpageflags, w->run, count, first, 0);
    if (got < 0)
        return -1;
    if (got < count)
        return 0;
    Py_ssize_t last_not_tail = -1;
    for (Py_ssize_t k = count - 1; k >= 0; k--) {
        if (!(w->run[k] & KPF_COMPOUND_TAIL)) {
            last_not_tail = k;
            break;
        }
    }
    uint64_t head = NO_HEAD;
    if (known && last_not_tail < 0)
        head = known_head;
    else if (last_not_tail >= 0 && (w->run[last_not_tail] & KPF_COMPOUND_HEAD))
        head = first + (uint64_t)last_not_tail;
    if (head != NO_HEAD && cache_learn(tails, head, pfn) < 0)
        return -1;
    *out = head;
    return 0;
}

/* -- the module's functions ------------------------------------------------------------------ */

static int work_init(Work *w, Py_ssize_t n)
{
    memset(w, 0, sizeof(*w));
    w->items = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(Item));
    if (w->items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void work_free(Work *w)
{
    PyMem_RawFree(w->items);
    PyMem_RawFree(w->run);
}

static PyObject *raise_work(Work *w)
{
    if (!PyErr_Occurred()) {
        errno = w->err;
        if (w->err == ENOMEM)
            return PyErr_NoMemory();
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return NULL;
}

static int views_match(Py_buffer *a, Py_buffer *b, const char *what)
{
    if (a->len % ENTRY || b->len != a->len) {
        PyErr_Format(PyExc_ValueError, "%s: %zd and %zd bytes, want equal multiples of 8", what,
                     a->len, b->len);
        return -1;
    }
    return 0;
}

/* pagemap entries of the sorted items -> PFNs (0: no page). Returns entries read or PFN_HIDDEN. */
static Py_ssize_t translate(Work *w, int pagemap, uint64_t max_gap)
{
    for (Py_ssize_t i = 0; i < w->n; i++)
        w->items[i].key /= kernel_page;
    Py_ssize_t read = read_items(w, pagemap, w->items, w->n, max_gap, ALL_ONES);
    if (read <= 0)
        return read;
    for (Py_ssize_t i = 0; i < w->n; i++) {
        uint64_t entry = w->items[i].value;
        if (entry == ALL_ONES || !(entry & PM_PRESENT)) {
            w->items[i].key = 0;
            continue;
        }
        if ((entry & PM_PFN_MASK) == 0)
            return PFN_HIDDEN;
        w->items[i].key = entry & PM_PFN_MASK;
    }
    return read;
}

static PyObject *prepare(PyObject *self, PyObject *args)
{
    Py_buffer addrs, heads;
    int pagemap, kpageflags, bitmap;
    PyObject *tails;
    unsigned long long pagemap_gap, kpageflags_gap, write_gap;
    if (!PyArg_ParseTuple(args, "y*w*iiiO!KKK:prepare", &addrs, &heads, &pagemap, &kpageflags,
                          &bitmap, &PyDict_Type, &tails, &pagemap_gap, &kpageflags_gap,
                          &write_gap))
        return NULL;
    PyObject *result = NULL;
    Work w;
    if (views_match(&addrs, &heads, "prepare: addrs and heads") < 0 ||
        work_init(&w, addrs.len / ENTRY) < 0)
        goto release;
    w.n = addrs.len / ENTRY;
    const uint64_t *in = addrs.buf;
    uint64_t *out = heads.buf;
    Py_ssize_t read = w.n;

    /* PFNs (as keys, sorted), then their flags (as values) */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < w.n; i++) {
        w.items[i].key = in[i];
        w.items[i].index = i;
    }
    sort_items(w.items, w.n);
    if (pagemap >= 0) {
        read = translate(&w, pagemap, pagemap_gap);
        sort_items(w.items, w.n);
    } else {
        for (Py_ssize_t i = 0; i < w.n; i++)
            w.items[i].key /= kernel_page;
    }
    if (read > 0) {
        Py_ssize_t first = 0;
        while (first < w.n && w.items[first].key == 0)
            w.items[first++].value = KPF_NOPAGE;
        if (read_items(&w, kpageflags, w.items + first, w.n - first, kpageflags_gap,
                       KPF_NOPAGE) < 0)
            read = -1;
    }
    Py_END_ALLOW_THREADS
    if (read == -1) {
        raise_work(&w);
        goto done;
    }
    if (read == 0 || read == PFN_HIDDEN) {
        for (Py_ssize_t i = 0; i < w.n; i++)
            out[i] = NO_HEAD;
        result = PyLong_FromSsize_t(read);
        goto done;
    }

    /* heads: a trackable page stands for itself, a tail for its head (walked in
     * address order, as the Python path learns tails) */
    uint64_t *flags = PyMem_RawMalloc((size_t)(w.n ? w.n : 1) * sizeof(uint64_t));
    if (flags == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < w.n; i++) {
        const Item *it = &w.items[i];
        flags[it->index] = it->value;
        out[it->index] = it->key != 0 && (it->value & KPF_LRU) ? it->key : NO_HEAD;
    }
    for (Py_ssize_t i = 0; i < w.n; i++) {
        if (out[i] == NO_HEAD || !(flags[i] & KPF_COMPOUND_TAIL))
            continue;
        if (find_head(&w, kpageflags, tails, out[i], &out[i]) < 0) {
            PyMem_RawFree(flags);
            raise_work(&w);
            goto done;
        }
    }
    PyMem_RawFree(flags);

    /* mark the heads idle: one word per 64 pages, the OR of its sampled bits */
    int failed;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < w.n; i++) {
        if (out[i] == NO_HEAD)
            continue;
        w.items[m].key = out[i] / WORD_PAGES;
        w.items[m].value = 1ULL << (out[i] % WORD_PAGES);
        m++;
    }
    sort_items(w.items, m);
    failed = write_items(&w, bitmap, w.items, m, write_gap) < 0;
    Py_END_ALLOW_THREADS
    if (failed) {
        raise_work(&w);
        goto done;
    }
    result = PyLong_FromSsize_t(read);
done:
    work_free(&w);
release:
    PyBuffer_Release(&addrs);
    PyBuffer_Release(&heads);
    return result;
}

static PyObject *check(PyObject *self, PyObject *args)
{
    Py_buffer heads, accessed;
    int bitmap;
    unsigned long long read_gap;
    if (!PyArg_ParseTuple(args, "y*w*iK:check", &heads, &accessed, &bitmap, &read_gap))
        return NULL;
    PyObject *result = NULL;
    Work w;
    Py_ssize_t n = heads.len / ENTRY;
    if (heads.len % ENTRY || accessed.len != n) {
        PyErr_Format(PyExc_ValueError, "check: %zd bytes of heads and %zd answers", heads.len,
                     accessed.len);
        goto release;
    }
    if (work_init(&w, n) < 0)
        goto release;
    const uint64_t *in = heads.buf;
    unsigned char *out = accessed.buf;
    Py_ssize_t failed;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = 0;
        if (in[i] == NO_HEAD)
            continue;
        w.items[m].key = in[i] / WORD_PAGES;
        w.items[m].index = i;
        m++;
    }
    sort_items(w.items, m);
    failed = read_items(&w, bitmap, w.items, m, read_gap, ALL_ONES);
    if (failed >= 0) {
        for (Py_ssize_t k = 0; k < m; k++) {
            Py_ssize_t i = w.items[k].index;
            out[i] = !((w.items[k].value >> (in[i] % WORD_PAGES)) & 1);
        }
    }
    Py_END_ALLOW_THREADS
    if (failed < 0)
        raise_work(&w);
    else
        result = Py_NewRef(Py_None);
    work_free(&w);
release:
    PyBuffer_Release(&heads);
    PyBuffer_Release(&accessed);
    return result;
}

static PyMethodDef methods[] = {
    {"prepare", prepare, METH_VARARGS,
     "prepare(addrs, heads, pagemap_fd, kpageflags_fd, bitmap_fd, tails, pagemap_gap, "
     "kpageflags_gap, write_gap) -> pagemap entries read: mark the sampled pages idle."},
    {"check", check, METH_VARARGS,
     "check(heads, accessed, bitmap_fd, read_gap): which marked pages were accessed since."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_page_idle",
    .m_doc = "One sample of the page_idle access check in one call (page_idle.py is the "
             "reference).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__page_idle(void)
{
    long page = sysconf(_SC_PAGESIZE);
    kernel_page = page > 0 ? (uint64_t)page : 4096;
    folio_block = kernel_page / ENTRY;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "NO_HEAD", PyLong_FromUnsignedLongLong(NO_HEAD)) < 0 ||
        PyModule_AddIntConstant(m, "PFN_HIDDEN", PFN_HIDDEN) < 0 ||
        PyModule_AddObject(m, "KPF_LRU", PyLong_FromUnsignedLongLong(KPF_LRU)) < 0 ||
        PyModule_AddObject(m, "KPF_COMPOUND_HEAD",
                           PyLong_FromUnsignedLongLong(KPF_COMPOUND_HEAD)) < 0 ||
        PyModule_AddObject(m, "KPF_COMPOUND_TAIL",
                           PyLong_FromUnsignedLongLong(KPF_COMPOUND_TAIL)) < 0 ||
        PyModule_AddObject(m, "KPF_NOPAGE", PyLong_FromUnsignedLongLong(KPF_NOPAGE)) < 0 ||
        PyModule_AddIntConstant(m, "KERNEL_PAGE", (long)kernel_page) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
