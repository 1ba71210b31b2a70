//! Python sequences of ints → Rust vectors, fast for the common case.
//!
//! Token ids and block hashes arrive as Python lists of thousands of ints; converting them is
//! most of the cost of a call (32 k tokens: ~150 µs item by item through the C API, more
//! through PyO3's generic sequence extraction, against ~20 µs to hash them). Three paths:
//!
//! * **`list` of exact `int`s, known object layout** — the items and their digits are read
//!   directly. The stable ABI does not expose these layouts, so at import [`init`] finds which
//!   one this interpreter uses (3.9–3.11: `ob_size` then 30-bit digits; 3.12 and later: `lv_tag`
//!   then 30-bit digits; both have the count at byte 16 and the digits at byte 24, and a list's
//!   item array pointer right after its `PyVarObject` head) and **checks it** on values it
//!   creates through the API (zero, small, one-, two- and three-digit, negative, too large)
//!   and on a list it builds. Any mismatch, another digit size, or an unknown version turns
//!   the path off for the process. Only reads are made, of memory inside the objects, and no
//!   Python code runs meanwhile (so the list cannot change).
//! * **`list` or `tuple`, item by item through the C API** — when the layout is unknown, for
//!   tuples (whose layout changed in 3.14), and for any item the direct path does not take
//!   (negative, too large, an `int` subclass such as `bool`, not an int):
//!   `PyList_GetItem` / `PyTuple_GetItem` (borrowed, bounds-checked) and
//!   `PyLong_AsUnsignedLongLong` (no `__index__`, so no Python code runs).
//! * **anything else** (other sequences, NumPy arrays, items with `__index__`) — Python's own
//!   rules, item by item.
//!
//! Errors name the argument and the position.

use std::sync::atomic::{AtomicU8, Ordering};

use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

/// How an int must fit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// `0 ≤ v < 2**32` (token ids).
    U32,
    /// `0 ≤ v < 2**64` (router hashes).
    U64,
    /// `-2**63 ≤ v < 2**64`, negatives bit-cast (engine hashes: vLLM sends unsigned, SGLang and
    /// Dynamo's API signed).
    AnyI64OrU64,
}

impl Range {
    fn describe(self) -> &'static str {
        match self {
            Range::U32 => "0 <= v < 2**32",
            Range::U64 => "0 <= v < 2**64",
            Range::AnyI64OrU64 => "-2**63 <= v < 2**64",
        }
    }

    fn max(self) -> u64 {
        match self {
            Range::U32 => u64::from(u32::MAX),
            _ => u64::MAX,
        }
    }
}

/// The int layout this interpreter was found to use (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Layout {
    /// Not checked yet, or the check failed: the direct path is off.
    Off = 0,
    /// CPython 3.9–3.11: signed `ob_size` (digit count, negative for negative numbers).
    Legacy = 1,
    /// CPython 3.12+: `lv_tag` = digit count << 3 | sign (0 positive, 1 zero, 2 negative).
    Tagged = 2,
}

static LAYOUT: AtomicU8 = AtomicU8::new(Layout::Off as u8);

fn layout() -> Layout {
    match LAYOUT.load(Ordering::Relaxed) {
        1 => Layout::Legacy,
        2 => Layout::Tagged,
        _ => Layout::Off,
    }
}

/// Byte offset of the digit count / tag in an int, and of its first digit.
const INT_HEAD: usize = 16;
const INT_DIGITS: usize = 24;
/// Bits per digit the direct path understands.
const DIGIT_BITS: u32 = 30;

/// Reads `obj` (an exact `int`) if it is a non-negative value of at most three 30-bit digits
/// whose value fits in `u64`.
///
/// # Safety
/// `obj` must point to a live object of exact type `int`, and `layout` must be the one
/// [`init`] verified for this interpreter.
#[inline]
unsafe fn read_int(obj: *mut ffi::PyObject, layout: Layout) -> Option<u64> {
    let head = head_of(obj);
    let ndigits = match layout {
        Layout::Legacy if head >= 0 => head as usize,
        Layout::Tagged => {
            let tag = head as usize;
            match tag & 3 {
                0 => tag >> 3,
                1 => return Some(0),
                _ => return None,
            }
        }
        _ => return None,
    };
    let d = digits_of(obj);
    let mask = (1u64 << DIGIT_BITS) - 1;
    let digit = |i: usize| u64::from(d.add(i).read()) & mask;
    // Branches in order of frequency (token ids have one digit, 64-bit hashes three), not a
    // jump table.
    if ndigits == 1 {
        Some(digit(0))
    } else if ndigits == 3 {
        let top = digit(2);
        (top < 16).then(|| digit(0) | digit(1) << DIGIT_BITS | top << (2 * DIGIT_BITS))
    } else if ndigits == 2 {
        Some(digit(0) | digit(1) << DIGIT_BITS)
    } else if ndigits == 0 {
        Some(0)
    } else {
        None
    }
}

/// The digit count / tag of an int.
///
/// # Safety
/// `obj` must point to a live exact `int` of a verified layout.
#[inline(always)]
unsafe fn head_of(obj: *mut ffi::PyObject) -> isize {
    obj.cast::<u8>().add(INT_HEAD).cast::<isize>().read()
}

/// The digits of an int.
///
/// # Safety
/// As [`head_of`]; read only as many digits as the head says.
#[inline(always)]
unsafe fn digits_of(obj: *mut ffi::PyObject) -> *const u32 {
    obj.cast::<u8>().add(INT_DIGITS).cast::<u32>()
}

/// The item array and length of a list.
///
/// # Safety
/// `list` must point to a live exact `list`, with the GIL held; the result is valid until
/// Python code runs.
#[inline]
unsafe fn list_items(list: *mut ffi::PyObject) -> (*const *mut ffi::PyObject, usize) {
    let len = ffi::PyList_Size(list).max(0) as usize;
    let items = list
        .cast::<u8>()
        .add(std::mem::size_of::<ffi::PyVarObject>())
        .cast::<*const *mut ffi::PyObject>()
        .read();
    (items, len)
}

/// Finds and checks this interpreter's int and list layouts; called once at import. The
/// direct path stays off unless every check passes.
pub fn init(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    let (major, minor): (u32, u32) = {
        let v = sys.getattr("version_info")?;
        (
            v.getattr("major")?.extract()?,
            v.getattr("minor")?.extract()?,
        )
    };
    let impl_name: String = sys.getattr("implementation")?.getattr("name")?.extract()?;
    let info = sys.getattr("int_info")?;
    let bits: u32 = info.getattr("bits_per_digit")?.extract()?;
    let digit_size: u32 = info.getattr("sizeof_digit")?.extract()?;
    let candidate = match (impl_name.as_str(), major, minor) {
        ("cpython", 3, 9..=11) => Layout::Legacy,
        ("cpython", 3, 12..) => Layout::Tagged,
        _ => Layout::Off,
    };
    if candidate == Layout::Off || bits != DIGIT_BITS || digit_size != 4 {
        return Ok(());
    }
    if self_test(py, candidate)? {
        LAYOUT.store(candidate as u8, Ordering::Relaxed);
    }
    Ok(())
}

/// Whether reading ints and lists directly with `layout` gives what the C API says.
fn self_test(py: Python<'_>, layout: Layout) -> PyResult<bool> {
    let fits: [u64; 17] = [
        0,
        1,
        7,
        255,
        256,
        257,
        150_000,
        (1 << 30) - 1,
        1 << 30,
        (1 << 30) + 1,
        u64::from(u32::MAX),
        1 << 32,
        (1 << 59) + 12_345,
        (1 << 60) - 1,
        1 << 60,
        (1 << 63) + 99,
        u64::MAX,
    ];
    let mut objects: Vec<Bound<'_, PyAny>> = Vec::new();
    for v in fits {
        let obj = v.into_pyobject(py)?.into_any();
        // SAFETY: `obj` is a live exact int (created just above), the GIL is held.
        if unsafe { read_int(obj.as_ptr(), layout) } != Some(v) {
            return Ok(false);
        }
        objects.push(obj);
    }
    let too_big = py.eval(c"2**64 + 5", None, None)?;
    let not_fitting = [
        (-1i64).into_pyobject(py)?.into_any(),
        (-5i64).into_pyobject(py)?.into_any(),
        (-(1i64 << 40)).into_pyobject(py)?.into_any(),
        too_big,
        py.eval(c"2**100", None, None)?,
    ];
    for obj in &not_fitting {
        // SAFETY: as above.
        if unsafe { read_int(obj.as_ptr(), layout) }.is_some() {
            return Ok(false);
        }
    }
    let list = PyList::new(py, &objects)?;
    // SAFETY: `list` is a live exact list, the GIL is held and no Python code runs below.
    let (items, len) = unsafe { list_items(list.as_ptr()) };
    if len != objects.len() {
        return Ok(false);
    }
    for (i, obj) in objects.iter().enumerate() {
        // SAFETY: `i < len`, the item array of a live list.
        if unsafe { items.add(i).read() } != obj.as_ptr() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The layout the direct path uses (`"legacy"`, `"tagged"`), or None when it is off.
#[pyfunction]
pub fn _fast_int_layout() -> Option<&'static str> {
    match layout() {
        Layout::Legacy => Some("legacy"),
        Layout::Tagged => Some("tagged"),
        Layout::Off => None,
    }
}

/// Reads `obj` (a sequence of ints) into `u64`s checked against `range`. `what` names the
/// argument in errors (`"tokens"`, `"block_hashes"`).
pub fn extract_u64s(obj: &Bound<'_, PyAny>, what: &str, range: Range) -> PyResult<Vec<u64>> {
    let mut out = Vec::new();
    extract_into(obj, what, range, &mut out, |v| v)?;
    Ok(out)
}

/// Reads `obj` (a sequence of token ids) into `u32`s.
pub fn extract_u32s(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
    let mut out = Vec::new();
    extract_u32s_into(obj, what, &mut out)?;
    Ok(out)
}

/// Appends `obj` (a sequence of token ids) to `out`.
pub fn extract_u32s_into(obj: &Bound<'_, PyAny>, what: &str, out: &mut Vec<u32>) -> PyResult<()> {
    extract_into(obj, what, Range::U32, out, |v| v as u32)
}

fn extract_into<T>(
    obj: &Bound<'_, PyAny>,
    what: &str,
    range: Range,
    out: &mut Vec<T>,
    conv: impl Fn(u64) -> T,
) -> PyResult<()> {
    if let Ok(list) = obj.cast_exact::<PyList>() {
        let lay = layout();
        if lay != Layout::Off {
            return direct_list(list, lay, what, range, out, conv);
        }
        let ptr = list.as_ptr();
        // SAFETY: `ptr` is a live list (we hold a reference and the GIL); PyList_GetItem checks
        // the index against the current length and returns a borrowed item or NULL.
        let get = |i: usize| unsafe { ffi::PyList_GetItem(ptr, i as ffi::Py_ssize_t) };
        return item_by_item(obj, list.len(), get, what, range, out, conv);
    }
    if let Ok(tuple) = obj.cast_exact::<PyTuple>() {
        let ptr = tuple.as_ptr();
        // SAFETY: as above, for an (immutable) tuple.
        let get = |i: usize| unsafe { ffi::PyTuple_GetItem(ptr, i as ffi::Py_ssize_t) };
        return item_by_item(obj, tuple.len(), get, what, range, out, conv);
    }
    let not_a_sequence = || {
        PyTypeError::new_err(format!(
            "{what} must be a sequence of ints, not {}",
            type_name(obj)
        ))
    };
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>()
    {
        return Err(not_a_sequence());
    }
    let len = obj.len().map_err(|_| not_a_sequence())?;
    out.reserve(len);
    for (i, item) in obj.try_iter()?.enumerate() {
        out.push(conv(python_item(&item?, what, i, range)?));
    }
    Ok(())
}

/// The direct path over a list; items it cannot read go through [`python_item`], after which
/// the loop re-reads the list (Python code may have run).
fn direct_list<T>(
    list: &Bound<'_, PyList>,
    lay: Layout,
    what: &str,
    range: Range,
    out: &mut Vec<T>,
    conv: impl Fn(u64) -> T,
) -> PyResult<()> {
    let long_type = std::ptr::addr_of_mut!(ffi::PyLong_Type);
    let max = range.max();
    // The heads of positive one-digit ints (token ids below 2**30: nearly every token) and
    // three-digit ones (most 64-bit hashes).
    let (one_digit, three_digits): (isize, isize) = match lay {
        Layout::Tagged => (1 << 3, 3 << 3),
        _ => (1, 3),
    };
    let mut i = 0;
    loop {
        // SAFETY: `list` is a live exact list and the GIL is held; until `python_item` runs,
        // no Python code runs, so `items[..len]` stays valid and each item is a live object.
        // `out` has room for `len - i` more items (reserved below), written in place and
        // counted in `n`, which becomes its length before anything else can see it.
        unsafe {
            let (items, len) = list_items(list.as_ptr());
            out.reserve(len.saturating_sub(i));
            let dst = out.as_mut_ptr();
            let mut n = out.len();
            'items: while i < len {
                // Four at a time while all four are exact one-digit ints (token ids): their
                // checks are combined into one branch.
                while i + 4 <= len {
                    let p = [
                        items.add(i).read(),
                        items.add(i + 1).read(),
                        items.add(i + 2).read(),
                        items.add(i + 3).read(),
                    ];
                    // (Types first: only an int may be read past its object header.)
                    let mut odd = 0usize;
                    for &q in &p {
                        odd |= (ffi::Py_TYPE(q) as usize) ^ (long_type as usize);
                    }
                    if odd != 0 {
                        break;
                    }
                    for &q in &p {
                        odd |= (head_of(q) ^ one_digit) as usize;
                    }
                    if odd != 0 {
                        break;
                    }
                    for (k, &q) in p.iter().enumerate() {
                        dst.add(n + k).write(conv(u64::from(digits_of(q).read())));
                    }
                    n += 4;
                    i += 4;
                }
                // Then one by one, up to four items or the end: any readable int.
                let stop = (i + 4).min(len);
                while i < stop {
                    let item = items.add(i).read();
                    if ffi::Py_TYPE(item) != long_type {
                        break 'items;
                    }
                    let head = head_of(item);
                    let digits = digits_of(item);
                    let v = if head == one_digit {
                        u64::from(digits.read())
                    } else if head == three_digits && digits.add(2).read() < 16 && max == u64::MAX {
                        u64::from(digits.read())
                            | u64::from(digits.add(1).read()) << DIGIT_BITS
                            | u64::from(digits.add(2).read()) << (2 * DIGIT_BITS)
                    } else {
                        match read_int(item, lay) {
                            Some(v) if v <= max => v,
                            _ => break 'items,
                        }
                    };
                    dst.add(n).write(conv(v));
                    n += 1;
                    i += 1;
                }
            }
            out.set_len(n);
            if i >= len {
                return Ok(());
            }
        }
        let item = list.get_item(i)?;
        out.push(conv(python_item(&item, what, i, range)?));
        i += 1;
    }
}

fn item_by_item<T>(
    seq: &Bound<'_, PyAny>,
    len: usize,
    get: impl Fn(usize) -> *mut ffi::PyObject,
    what: &str,
    range: Range,
    out: &mut Vec<T>,
    conv: impl Fn(u64) -> T,
) -> PyResult<()> {
    out.reserve_exact(len);
    let long_type = std::ptr::addr_of_mut!(ffi::PyLong_Type);
    let max = range.max();
    for i in 0..len {
        let item = get(i);
        // SAFETY: `item` is NULL (index out of range after Python code changed a list) or a
        // borrowed reference to a live object held by the container.
        let v = unsafe {
            if item.is_null() {
                ffi::PyErr_Clear();
                None
            } else if ffi::Py_TYPE(item) != long_type {
                None
            } else {
                let v = ffi::PyLong_AsUnsignedLongLong(item);
                if v == u64::MAX && !ffi::PyErr_Occurred().is_null() {
                    ffi::PyErr_Clear();
                    None
                } else {
                    Some(v)
                }
            }
        };
        match v {
            Some(v) if v <= max => out.push(conv(v)),
            // Negative, too large, an int subclass, or not an int: Python's rules decide.
            _ => {
                let item = seq.get_item(i)?;
                out.push(conv(python_item(&item, what, i, range)?));
            }
        }
    }
    Ok(())
}

/// One item by Python's own rules (`__index__`), range-checked.
fn python_item(item: &Bound<'_, PyAny>, what: &str, i: usize, range: Range) -> PyResult<u64> {
    index_value(item, &format!("{what}[{i}]"), range)
}

fn index_value(obj: &Bound<'_, PyAny>, what: &str, range: Range) -> PyResult<u64> {
    let has_index = obj
        .hasattr(pyo3::intern!(obj.py(), "__index__"))
        .unwrap_or(false);
    if !has_index || obj.is_instance_of::<pyo3::types::PyFloat>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be an int, not {}",
            type_name(obj)
        )));
    }
    let v = match range {
        Range::U32 => obj.extract::<u32>().map(u64::from).ok(),
        Range::U64 => obj.extract::<u64>().ok(),
        Range::AnyI64OrU64 => obj
            .extract::<u64>()
            .ok()
            .or_else(|| obj.extract::<i64>().ok().map(|v| v as u64)),
    };
    v.ok_or_else(|| {
        PyOverflowError::new_err(format!(
            "{what} = {} is out of range ({})",
            obj.repr().map_or_else(|_| "?".into(), |r| r.to_string()),
            range.describe()
        ))
    })
}

/// One engine hash argument (signed or unsigned 64-bit), by Python's rules.
pub fn extract_engine_hash(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    index_value(obj, what, Range::AnyI64OrU64)
}

/// The Python type name of `obj`, for messages.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

/// A new Python list of ints from `values`. Items are written straight into the new list's
/// item array when the list layout was verified (what `PyList_SET_ITEM` does), otherwise
/// through `PyList_SetItem`.
pub fn u64_list<'py>(
    py: Python<'py>,
    values: impl ExactSizeIterator<Item = u64>,
) -> PyResult<Bound<'py, PyList>> {
    let n = values.len() as ffi::Py_ssize_t;
    // SAFETY: PyList_New returns a new reference to a list of `n` NULL items, or NULL with an
    // exception set. Each item gets a new reference from PyLong_FromUnsignedLongLong, whose
    // ownership passes to the list (NULL items are allowed while we fill it, and on failure
    // the partially filled list is released by dropping the Bound).
    unsafe {
        let list =
            Bound::from_owned_ptr_or_err(py, ffi::PyList_New(n))?.cast_into_unchecked::<PyList>();
        let direct = layout() != Layout::Off;
        let items = list_items(list.as_ptr()).0.cast_mut();
        for (i, v) in values.enumerate().take(n as usize) {
            let obj = ffi::PyLong_FromUnsignedLongLong(v);
            if obj.is_null() {
                return Err(PyErr::fetch(py));
            }
            if direct {
                items.add(i).write(obj);
            } else if ffi::PyList_SetItem(list.as_ptr(), i as ffi::Py_ssize_t, obj) != 0 {
                return Err(PyErr::fetch(py));
            }
        }
        Ok(list)
    }
}
