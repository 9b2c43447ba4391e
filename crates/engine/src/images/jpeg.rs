//! A baseline and progressive JPEG decoder with the arithmetic of libjpeg-turbo's default
//! decompression (as Pillow runs it): accurate integer IDCT (`jidctint.c`), fancy chroma
//! upsampling with replicated edge rows (`jdsample.c`), table-driven YCbCr to RGB
//! (`jdcolor.c`), so that decoded pixels equal Pillow's.
//!
//! Supported: 8-bit Huffman-coded sequential (SOF0/SOF1) and progressive (SOF2) images with 1
//! or 3 components, any sampling factors up to 4, restart intervals. Refused with an error:
//! arithmetic coding, lossless, 12-bit, CMYK.
//!
//! Why our own and not the `image` crate's (zune-jpeg): diffusers reads init images and masks
//! with Pillow, and zune-jpeg's IDCT and chroma upsampling round differently (up to 3 levels in
//! some pixels), so the same JPEG gave other latents than the reference. Decoding exactly as
//! libjpeg-turbo does keeps JPEG inputs inside the parity tolerances. PNG and WebP are lossless
//! and go through the `image` crate.
//!
//! Why one long file: the parts of the decoder (markers, Huffman and progressive scans, IDCT,
//! upsampling, colour conversion) share the frame state and are only meaningful together; its
//! tests against Pillow's pixels are at the end.

const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// A decoded image: 1 (gray) or 3 (RGB) interleaved channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

type R<T> = Result<T, String>;

#[derive(Clone, Default)]
struct Huffman {
    /// (length, value) for codes of up to 9 bits, indexed by the next 9 bits.
    fast: Vec<(u8, u8)>,
    maxcode: [i32; 18],
    valoffset: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> R<Self> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total != values.len() || total > 256 {
            return Err("a Huffman table is malformed".into());
        }
        let mut maxcode = [-1i32; 18];
        let mut valoffset = [0i32; 17];
        let mut fast = vec![(0u8, 0u8); 512];
        let mut code = 0i32;
        let mut k = 0usize;
        for len in 1..=16usize {
            let n = counts[len - 1] as usize;
            valoffset[len] = k as i32 - code;
            for _ in 0..n {
                if len <= 9 {
                    let shift = 9 - len;
                    let base = (code as usize) << shift;
                    for extra in 0..(1usize << shift) {
                        if let Some(slot) = fast.get_mut(base | extra) {
                            *slot = (len as u8, values[k]);
                        }
                    }
                }
                code += 1;
                k += 1;
            }
            if n > 0 {
                maxcode[len] = code - 1;
            }
            if code > (1 << len) {
                return Err("a Huffman table has too many codes".into());
            }
            code <<= 1;
        }
        maxcode[17] = i32::MAX;
        Ok(Huffman {
            fast,
            maxcode,
            valoffset,
            values,
        })
    }
}

/// Reads the entropy-coded bits of a scan; markers end the data (zeros are read past them, as
/// libjpeg does with a truncated or corrupt scan).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    count: u32,
    marker: Option<u8>,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits {
            data,
            pos,
            acc: 0,
            count: 0,
            marker: None,
        }
    }

    fn fill(&mut self) {
        while self.count <= 56 {
            let mut byte = 0u8;
            if self.marker.is_none() && self.pos < self.data.len() {
                byte = self.data[self.pos];
                if byte == 0xFF {
                    let next = self.data.get(self.pos + 1).copied().unwrap_or(0xD9);
                    if next == 0x00 {
                        self.pos += 2;
                    } else {
                        self.marker = Some(next);
                        byte = 0;
                    }
                } else {
                    self.pos += 1;
                }
            }
            self.acc |= u64::from(byte) << (56 - self.count);
            self.count += 8;
        }
    }

    fn peek(&mut self, n: u32) -> u32 {
        if self.count < n {
            self.fill();
        }
        (self.acc >> (64 - n)) as u32
    }

    fn skip(&mut self, n: u32) {
        self.acc <<= n;
        self.count -= n;
    }

    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.peek(n);
        self.skip(n);
        v
    }

    fn bit(&mut self) -> bool {
        self.bits(1) == 1
    }

    fn decode(&mut self, h: &Huffman) -> R<u8> {
        let (len, value) = h.fast[self.peek(9) as usize];
        if len > 0 {
            self.skip(u32::from(len));
            return Ok(value);
        }
        let mut code = self.bits(9) as i32;
        let mut len = 9;
        while code > h.maxcode[len] {
            code = (code << 1) | self.bits(1) as i32;
            len += 1;
            if len > 16 {
                return Err("corrupt entropy-coded data (bad Huffman code)".into());
            }
        }
        h.values
            .get((code + h.valoffset[len]) as usize)
            .copied()
            .ok_or_else(|| "corrupt entropy-coded data".to_string())
    }

    /// `s` more bits as a signed value (JPEG's EXTEND).
    fn receive_extend(&mut self, s: u32) -> i32 {
        if s == 0 {
            return 0;
        }
        let v = self.bits(s) as i32;
        if v < (1 << (s - 1)) {
            v - (1 << s) + 1
        } else {
            v
        }
    }

    /// Moves to the byte after the next RST marker (restart intervals).
    fn restart(&mut self) {
        self.acc = 0;
        self.count = 0;
        match self.marker.take() {
            Some(m) if (0xD0..=0xD7).contains(&m) => self.pos += 2,
            Some(m) => self.marker = Some(m),
            None => {
                // Look for the marker in the data.
                while self.pos + 1 < self.data.len() {
                    if self.data[self.pos] == 0xFF
                        && (0xD0..=0xD7).contains(&self.data[self.pos + 1])
                    {
                        self.pos += 2;
                        return;
                    }
                    if self.data[self.pos] == 0xFF && self.data[self.pos + 1] != 0 {
                        return;
                    }
                    self.pos += 1;
                }
            }
        }
    }

    /// The position after the scan's data (at the next marker).
    fn end(&self) -> usize {
        let mut p = self.pos;
        while p + 1 < self.data.len() {
            if self.data[p] == 0xFF
                && self.data[p + 1] != 0
                && !(0xD0..=0xD7).contains(&self.data[p + 1])
            {
                return p;
            }
            p += 1;
        }
        self.data.len()
    }
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks per row and column of the component itself, and MCU-padded.
    bw: usize,
    bh: usize,
    bw_pad: usize,
    bh_pad: usize,
    coeffs: Vec<i32>,
    quant: Option<[u16; 64]>,
    dc_pred: i32,
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
}

fn u16be(d: &[u8], p: usize) -> R<usize> {
    match (d.get(p), d.get(p + 1)) {
        (Some(&a), Some(&b)) => Ok((usize::from(a) << 8) | usize::from(b)),
        _ => Err("the file ends inside a marker".into()),
    }
}

/// Decodes a JPEG file. `max_pixels` bounds width x height (checked before decoding).
pub fn decode(data: &[u8], max_pixels: usize) -> R<Decoded> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return Err("not a JPEG file".into());
    }
    let mut quant: [Option<[u16; 64]>; 4] = [None; 4];
    let mut dc_tables: [Option<Huffman>; 4] = Default::default();
    let mut ac_tables: [Option<Huffman>; 4] = Default::default();
    let mut frame: Option<Frame> = None;
    let mut restart_interval = 0usize;
    let mut jfif = false;
    let mut adobe: Option<u8> = None;
    let mut eobrun;
    let mut pos = 2;
    loop {
        // Find the next marker.
        while pos < data.len() && data[pos] != 0xFF {
            pos += 1;
        }
        while pos < data.len() && data[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = data.get(pos) else {
            break;
        };
        pos += 1;
        match marker {
            0xD9 => break,
            0xD0..=0xD7 | 0x01 => continue,
            _ => {}
        }
        let len = u16be(data, pos)?;
        if len < 2 || pos + len > data.len() {
            return Err("the file ends inside a marker segment".into());
        }
        let seg = &data[pos + 2..pos + len];
        let next = pos + len;
        match marker {
            0xDB => {
                let mut p = 0;
                while p < seg.len() {
                    let pq = seg[p] >> 4;
                    let tq = usize::from(seg[p] & 15);
                    if tq > 3 {
                        return Err("bad quantisation table id".into());
                    }
                    p += 1;
                    let mut table = [0u16; 64];
                    for &z in ZIGZAG.iter() {
                        let v = if pq == 0 {
                            let v = seg.get(p).copied().ok_or("short quantisation table")?;
                            p += 1;
                            u16::from(v)
                        } else {
                            let v = u16be(seg, p)? as u16;
                            p += 2;
                            v
                        };
                        table[z] = v;
                    }
                    quant[tq] = Some(table);
                }
            }
            0xC4 => {
                let mut p = 0;
                while p < seg.len() {
                    let class = seg[p] >> 4;
                    let id = usize::from(seg[p] & 15);
                    if id > 3 || class > 1 || p + 17 > seg.len() {
                        return Err("bad Huffman table".into());
                    }
                    let mut counts = [0u8; 16];
                    counts.copy_from_slice(&seg[p + 1..p + 17]);
                    let n: usize = counts.iter().map(|&c| c as usize).sum();
                    p += 17;
                    let values = seg.get(p..p + n).ok_or("short Huffman table")?.to_vec();
                    p += n;
                    let table = Huffman::new(&counts, values)?;
                    if class == 0 {
                        dc_tables[id] = Some(table);
                    } else {
                        ac_tables[id] = Some(table);
                    }
                }
            }
            0xDD => restart_interval = u16be(seg, 0)?,
            0xE0 => jfif |= seg.starts_with(b"JFIF\0"),
            0xEE if seg.starts_with(b"Adobe") && seg.len() >= 12 => adobe = Some(seg[11]),
            0xC0..=0xC2 => {
                if frame.is_some() {
                    return Err("more than one frame".into());
                }
                if seg.len() < 6 || seg[0] != 8 {
                    return Err("only 8-bit JPEG is supported".into());
                }
                let height = u16be(seg, 1)?;
                let width = u16be(seg, 3)?;
                let n = usize::from(seg[5]);
                if width == 0 || height == 0 {
                    return Err("the image has no pixels (or a DNL height, not supported)".into());
                }
                if width.saturating_mul(height) > max_pixels {
                    return Err(format!("is {width}x{height}, over the pixel limit"));
                }
                if n != 1 && n != 3 {
                    return Err(format!(
                        "has {n} colour components; only grayscale and YCbCr/RGB JPEG are supported"
                    ));
                }
                let mut comps = Vec::with_capacity(n);
                for c in 0..n {
                    let b = seg.get(6 + 3 * c..9 + 3 * c).ok_or("short frame header")?;
                    let (h, v) = (usize::from(b[1] >> 4), usize::from(b[1] & 15));
                    if !(1..=4).contains(&h) || !(1..=4).contains(&v) || b[2] > 3 {
                        return Err("bad sampling factors".into());
                    }
                    comps.push(Component {
                        id: b[0],
                        h,
                        v,
                        tq: usize::from(b[2]),
                        bw: 0,
                        bh: 0,
                        bw_pad: 0,
                        bh_pad: 0,
                        coeffs: Vec::new(),
                        quant: None,
                        dc_pred: 0,
                    });
                }
                let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
                let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
                let mcux = width.div_ceil(8 * hmax);
                let mcuy = height.div_ceil(8 * vmax);
                for c in &mut comps {
                    let cw = (width * c.h).div_ceil(hmax);
                    let ch = (height * c.v).div_ceil(vmax);
                    c.bw = cw.div_ceil(8);
                    c.bh = ch.div_ceil(8);
                    c.bw_pad = mcux * c.h;
                    c.bh_pad = mcuy * c.v;
                    c.coeffs = vec![0; c.bw_pad * c.bh_pad * 64];
                }
                frame = Some(Frame {
                    width,
                    height,
                    progressive: marker == 0xC2,
                    comps,
                    hmax,
                    vmax,
                    mcux,
                    mcuy,
                });
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(
                    "arithmetic-coded, lossless and hierarchical JPEG are not supported".into(),
                )
            }
            0xDA => {
                let f = frame.as_mut().ok_or("a scan before the frame header")?;
                let ns = usize::from(*seg.first().ok_or("short scan header")?);
                if ns == 0 || ns > 4 || seg.len() < 1 + 2 * ns + 3 {
                    return Err("bad scan header".into());
                }
                let mut scomps = Vec::with_capacity(ns);
                for i in 0..ns {
                    let id = seg[1 + 2 * i];
                    let tables = seg[2 + 2 * i];
                    let ci = f
                        .comps
                        .iter()
                        .position(|c| c.id == id)
                        .ok_or("a scan names an unknown component")?;
                    scomps.push((
                        ci,
                        usize::from(tables >> 4) & 3,
                        usize::from(tables & 15) & 3,
                    ));
                }
                let ss = usize::from(seg[1 + 2 * ns]);
                let se = usize::from(seg[2 + 2 * ns]);
                let ah = u32::from(seg[3 + 2 * ns] >> 4);
                let al = u32::from(seg[3 + 2 * ns] & 15);
                if ss > 63 || se > 63 || ss > se || (!f.progressive && (ss != 0 || se != 63)) {
                    return Err("bad spectral selection".into());
                }
                for &(ci, _, _) in &scomps {
                    let c = &mut f.comps[ci];
                    if c.quant.is_none() {
                        c.quant = quant[c.tq];
                    }
                    c.dc_pred = 0;
                }
                eobrun = 0u32;
                let mut bits = Bits::new(data, next);
                // Blocks visited in order: one component alone goes through its own blocks;
                // several go MCU by MCU.
                let units: Vec<Vec<(usize, usize, usize)>> = if ns == 1 {
                    let ci = scomps[0].0;
                    let c = &f.comps[ci];
                    (0..c.bh)
                        .flat_map(|by| (0..c.bw).map(move |bx| vec![(ci, bx, by)]))
                        .collect()
                } else {
                    let mut u = Vec::with_capacity(f.mcux * f.mcuy);
                    for my in 0..f.mcuy {
                        for mx in 0..f.mcux {
                            let mut blocks = Vec::new();
                            for &(ci, _, _) in &scomps {
                                let c = &f.comps[ci];
                                for v in 0..c.v {
                                    for h in 0..c.h {
                                        blocks.push((ci, mx * c.h + h, my * c.v + v));
                                    }
                                }
                            }
                            u.push(blocks);
                        }
                    }
                    u
                };
                for (n, unit) in units.iter().enumerate() {
                    if restart_interval > 0 && n > 0 && n % restart_interval == 0 {
                        bits.restart();
                        for &(ci, _, _) in &scomps {
                            f.comps[ci].dc_pred = 0;
                        }
                        eobrun = 0;
                    }
                    for &(ci, bx, by) in unit {
                        let (_, td, ta) = scomps
                            .iter()
                            .copied()
                            .find(|s| s.0 == ci)
                            .ok_or("internal: scan component")?;
                        let c = &mut f.comps[ci];
                        let at = (by * c.bw_pad + bx) * 64;
                        let block = &mut c.coeffs[at..at + 64];
                        if !f.progressive {
                            let dc = dc_tables[td].as_ref().ok_or("missing DC Huffman table")?;
                            let ac = ac_tables[ta].as_ref().ok_or("missing AC Huffman table")?;
                            let t = dc_category(bits.decode(dc)?)?;
                            c.dc_pred = c.dc_pred.wrapping_add(bits.receive_extend(t));
                            block[0] = jcoef(c.dc_pred);
                            let mut k = 1;
                            while k < 64 {
                                let rs = bits.decode(ac)?;
                                let (r, s) = (usize::from(rs >> 4), u32::from(rs & 15));
                                if s == 0 {
                                    if r == 15 {
                                        k += 16;
                                        continue;
                                    }
                                    break;
                                }
                                k += r;
                                if k > 63 {
                                    break;
                                }
                                block[ZIGZAG[k]] = jcoef(bits.receive_extend(s));
                                k += 1;
                            }
                        } else if ss == 0 {
                            if ah == 0 {
                                let dc =
                                    dc_tables[td].as_ref().ok_or("missing DC Huffman table")?;
                                let t = dc_category(bits.decode(dc)?)?;
                                c.dc_pred = c.dc_pred.wrapping_add(bits.receive_extend(t));
                                block[0] = jcoef(c.dc_pred.wrapping_shl(al));
                            } else if bits.bit() {
                                block[0] = jcoef(block[0] | (1 << al));
                            }
                        } else {
                            let ac = ac_tables[ta].as_ref().ok_or("missing AC Huffman table")?;
                            if ah == 0 {
                                ac_first(&mut bits, ac, block, ss, se, al, &mut eobrun)?;
                            } else {
                                ac_refine(&mut bits, ac, block, ss, se, al, &mut eobrun)?;
                            }
                        }
                    }
                }
                pos = bits.end();
                continue;
            }
            _ => {}
        }
        pos = next;
    }
    let f = frame.ok_or("no frame header")?;
    finish(f, jfif, adobe)
}

/// A coefficient as libjpeg stores it (`JCOEF`, 16 bits).
fn jcoef(v: i32) -> i32 {
    i32::from(v as i16)
}

/// A DC magnitude category (at most 16 bits follow).
fn dc_category(t: u8) -> R<u32> {
    if t > 16 {
        return Err("corrupt entropy-coded data (bad DC category)".into());
    }
    Ok(u32::from(t))
}

fn ac_first(
    bits: &mut Bits,
    ac: &Huffman,
    block: &mut [i32],
    ss: usize,
    se: usize,
    al: u32,
    eobrun: &mut u32,
) -> R<()> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = ss;
    while k <= se {
        let rs = bits.decode(ac)?;
        let (r, s) = (u32::from(rs >> 4), u32::from(rs & 15));
        if s != 0 {
            k += r as usize;
            if k > 63 {
                break;
            }
            block[ZIGZAG[k]] = jcoef(bits.receive_extend(s).wrapping_shl(al));
        } else if r == 15 {
            k += 15;
        } else {
            *eobrun = (1 << r) - 1;
            if r > 0 {
                *eobrun += bits.bits(r);
            }
            break;
        }
        k += 1;
    }
    Ok(())
}

fn ac_refine(
    bits: &mut Bits,
    ac: &Huffman,
    block: &mut [i32],
    ss: usize,
    se: usize,
    al: u32,
    eobrun: &mut u32,
) -> R<()> {
    let p1 = 1i32 << al;
    let m1 = -1i32 << al;
    let refine = |bits: &mut Bits, coef: &mut i32| {
        if bits.bit() && (*coef & p1) == 0 {
            *coef = jcoef(*coef + if *coef >= 0 { p1 } else { m1 });
        }
    };
    let mut k = ss;
    if *eobrun == 0 {
        while k <= se {
            let rs = bits.decode(ac)?;
            let (mut r, s) = (i32::from(rs >> 4), rs & 15);
            let mut value = 0;
            if s != 0 {
                value = if bits.bit() { p1 } else { m1 };
            } else if r != 15 {
                *eobrun = 1 << r;
                if r > 0 {
                    *eobrun += bits.bits(r as u32);
                }
                break;
            }
            while k <= se {
                let coef = &mut block[ZIGZAG[k]];
                if *coef != 0 {
                    refine(bits, coef);
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if value != 0 && k <= 63 {
                block[ZIGZAG[k]] = value;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= se {
            let coef = &mut block[ZIGZAG[k]];
            if *coef != 0 {
                refine(bits, coef);
            }
            k += 1;
        }
        *eobrun -= 1;
    }
    Ok(())
}

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;

fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// libjpeg's post-IDCT range limit: centre at 128, clamp, and wrap far-out values as its
/// 1024-entry table does.
fn range_limit(x: i64) -> u8 {
    let i = (x & 1023) as usize;
    if i < 128 {
        (i + 128) as u8
    } else if i < 512 {
        255
    } else if i < 896 {
        0
    } else {
        (i - 896) as u8
    }
}

/// `jpeg_idct_islow`: dequantised coefficients (natural order) to 8x8 samples.
fn idct_islow(coef: &[i32], q: &[u16; 64], out: &mut [u8], stride: usize) {
    let mut ws = [0i64; 64];
    const F0_298: i64 = 2446;
    const F0_390: i64 = 3196;
    const F0_541: i64 = 4433;
    const F0_765: i64 = 6270;
    const F0_899: i64 = 7373;
    const F1_175: i64 = 9633;
    const F1_501: i64 = 12299;
    const F1_847: i64 = 15137;
    const F1_961: i64 = 16069;
    const F2_053: i64 = 16819;
    const F2_562: i64 = 20995;
    const F3_072: i64 = 25172;
    let deq = |i: usize| i64::from(coef[i]) * i64::from(q[i]);
    for col in 0..8 {
        if (1..8).all(|r| coef[r * 8 + col] == 0) {
            let dc = deq(col) << PASS1_BITS;
            for r in 0..8 {
                ws[r * 8 + col] = dc;
            }
            continue;
        }
        let z2 = deq(16 + col);
        let z3 = deq(48 + col);
        let z1 = (z2 + z3) * F0_541;
        let tmp2 = z1 + z3 * -F1_847;
        let tmp3 = z1 + z2 * F0_765;
        let z2 = deq(col);
        let z3 = deq(32 + col);
        let tmp0 = (z2 + z3) << CONST_BITS;
        let tmp1 = (z2 - z3) << CONST_BITS;
        let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
        let (o0, o1, o2, o3) = odd(deq(56 + col), deq(40 + col), deq(24 + col), deq(8 + col));
        let n = CONST_BITS - PASS1_BITS;
        ws[col] = descale(tmp10 + o3, n);
        ws[56 + col] = descale(tmp10 - o3, n);
        ws[8 + col] = descale(tmp11 + o2, n);
        ws[48 + col] = descale(tmp11 - o2, n);
        ws[16 + col] = descale(tmp12 + o1, n);
        ws[40 + col] = descale(tmp12 - o1, n);
        ws[24 + col] = descale(tmp13 + o0, n);
        ws[32 + col] = descale(tmp13 - o0, n);
    }
    fn odd(t0: i64, t1: i64, t2: i64, t3: i64) -> (i64, i64, i64, i64) {
        let z1 = t0 + t3;
        let z2 = t1 + t2;
        let z3 = t0 + t2;
        let z4 = t1 + t3;
        let z5 = (z3 + z4) * F1_175;
        let t0 = t0 * F0_298;
        let t1 = t1 * F2_053;
        let t2 = t2 * F3_072;
        let t3 = t3 * F1_501;
        let z1 = z1 * -F0_899;
        let z2 = z2 * -F2_562;
        let z3 = z3 * -F1_961 + z5;
        let z4 = z4 * -F0_390 + z5;
        (t0 + z1 + z3, t1 + z2 + z4, t2 + z2 + z3, t3 + z1 + z4)
    }
    let n = CONST_BITS + PASS1_BITS + 3;
    for row in 0..8 {
        let w = &ws[row * 8..row * 8 + 8];
        let o = &mut out[row * stride..row * stride + 8];
        if w[1..].iter().all(|&v| v == 0) {
            let v = range_limit(descale(w[0], PASS1_BITS + 3));
            o.fill(v);
            continue;
        }
        let z1 = (w[2] + w[6]) * F0_541;
        let tmp2 = z1 + w[6] * -F1_847;
        let tmp3 = z1 + w[2] * F0_765;
        let tmp0 = (w[0] + w[4]) << CONST_BITS;
        let tmp1 = (w[0] - w[4]) << CONST_BITS;
        let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
        let (o0, o1, o2, o3) = odd(w[7], w[5], w[3], w[1]);
        o[0] = range_limit(descale(tmp10 + o3, n));
        o[7] = range_limit(descale(tmp10 - o3, n));
        o[1] = range_limit(descale(tmp11 + o2, n));
        o[6] = range_limit(descale(tmp11 - o2, n));
        o[2] = range_limit(descale(tmp12 + o1, n));
        o[5] = range_limit(descale(tmp12 - o1, n));
        o[3] = range_limit(descale(tmp13 + o0, n));
        o[4] = range_limit(descale(tmp13 - o0, n));
    }
}

/// A component's samples at its own resolution: (plane, width, height) with the rows below
/// the image replicated from the last real one.
fn component_plane(c: &Component, cw: usize, ch: usize) -> R<Vec<u8>> {
    let q = c.quant.ok_or("a component has no quantisation table")?;
    let stride = c.bw_pad * 8;
    let mut plane = vec![0u8; stride * c.bh_pad * 8];
    for by in 0..c.bh_pad {
        for bx in 0..c.bw_pad {
            let at = (by * c.bw_pad + bx) * 64;
            let off = by * 8 * stride + bx * 8;
            idct_islow(&c.coeffs[at..at + 64], &q, &mut plane[off..], stride);
        }
    }
    let mut out = vec![0u8; cw * ch];
    for y in 0..ch {
        out[y * cw..(y + 1) * cw].copy_from_slice(&plane[y * stride..y * stride + cw]);
    }
    Ok(out)
}

/// Upsamples a component to (hf * cw) x (vf * ch) as libjpeg-turbo does by default.
fn upsample(p: &[u8], cw: usize, ch: usize, hf: usize, vf: usize) -> Vec<u8> {
    let row = |y: isize| -> &[u8] {
        let y = y.clamp(0, ch as isize - 1) as usize;
        &p[y * cw..(y + 1) * cw]
    };
    let ow = cw * hf;
    let mut out = vec![0u8; ow * ch * vf];
    match (hf, vf) {
        (1, 1) => out.copy_from_slice(p),
        (2, 1) if cw > 2 => {
            for y in 0..ch {
                let i = row(y as isize);
                let o = &mut out[y * ow..(y + 1) * ow];
                h2v1_row(i, o);
            }
        }
        (1, 2) => {
            for y in 0..ch {
                for (v, bias) in [(0isize, 1u32), (1, 2)] {
                    let i0 = row(y as isize);
                    let i1 = row(y as isize + if v == 0 { -1 } else { 1 });
                    let o = &mut out[(2 * y + v as usize) * ow..(2 * y + v as usize + 1) * ow];
                    for x in 0..cw {
                        o[x] = ((u32::from(i0[x]) * 3 + u32::from(i1[x]) + bias) >> 2) as u8;
                    }
                }
            }
        }
        (2, 2) if cw > 2 => {
            for y in 0..ch {
                for v in 0..2usize {
                    let i0 = row(y as isize);
                    let i1 = row(y as isize + if v == 0 { -1 } else { 1 });
                    let o = &mut out[(2 * y + v) * ow..(2 * y + v + 1) * ow];
                    let sum = |x: usize| u32::from(i0[x]) * 3 + u32::from(i1[x]);
                    let mut this = sum(0);
                    let mut next = sum(1);
                    o[0] = ((this * 4 + 8) >> 4) as u8;
                    o[1] = ((this * 3 + next + 7) >> 4) as u8;
                    let mut last = this;
                    this = next;
                    for x in 1..cw - 1 {
                        next = sum(x + 1);
                        o[2 * x] = ((this * 3 + last + 8) >> 4) as u8;
                        o[2 * x + 1] = ((this * 3 + next + 7) >> 4) as u8;
                        last = this;
                        this = next;
                    }
                    o[2 * (cw - 1)] = ((this * 3 + last + 8) >> 4) as u8;
                    o[2 * (cw - 1) + 1] = ((this * 4 + 7) >> 4) as u8;
                }
            }
        }
        _ => {
            // Box replication (libjpeg's int_upsample and the small-width cases).
            for y in 0..ch * vf {
                let i = row((y / vf) as isize);
                for x in 0..ow {
                    out[y * ow + x] = i[x / hf];
                }
            }
        }
    }
    out
}

fn h2v1_row(i: &[u8], o: &mut [u8]) {
    let w = i.len();
    let v = |x: usize| u32::from(i[x]);
    o[0] = i[0];
    o[1] = ((v(0) * 3 + v(1) + 2) >> 2) as u8;
    for x in 1..w - 1 {
        let t = v(x) * 3;
        o[2 * x] = ((t + v(x - 1) + 1) >> 2) as u8;
        o[2 * x + 1] = ((t + v(x + 1) + 2) >> 2) as u8;
    }
    o[2 * (w - 1)] = ((v(w - 1) * 3 + v(w - 2) + 1) >> 2) as u8;
    o[2 * (w - 1) + 1] = i[w - 1];
}

fn finish(f: Frame, jfif: bool, adobe: Option<u8>) -> R<Decoded> {
    let (w, h) = (f.width, f.height);
    let mut planes = Vec::with_capacity(f.comps.len());
    for c in &f.comps {
        let cw = (w * c.h).div_ceil(f.hmax);
        let ch = (h * c.v).div_ceil(f.vmax);
        let plane = component_plane(c, cw, ch)?;
        let (hf, vf) = (f.hmax / c.h, f.vmax / c.v);
        if !f.hmax.is_multiple_of(c.h) || !f.vmax.is_multiple_of(c.v) {
            return Err("fractional sampling factors are not supported".into());
        }
        let up = upsample(&plane, cw, ch, hf, vf);
        let uw = cw * hf;
        let mut full = vec![0u8; w * h];
        for y in 0..h {
            full[y * w..(y + 1) * w].copy_from_slice(&up[y * uw..y * uw + w]);
        }
        planes.push(full);
    }
    if planes.len() == 1 {
        return Ok(Decoded {
            width: w,
            height: h,
            channels: 1,
            pixels: planes.remove(0),
        });
    }
    // libjpeg's colour-space guess for three components.
    let ids: Vec<u8> = f.comps.iter().map(|c| c.id).collect();
    let rgb = match adobe {
        Some(t) => t == 0,
        None => !jfif && ids == [b'R', b'G', b'B'],
    };
    let mut pixels = vec![0u8; w * h * 3];
    if rgb {
        for i in 0..w * h {
            pixels[3 * i] = planes[0][i];
            pixels[3 * i + 1] = planes[1][i];
            pixels[3 * i + 2] = planes[2][i];
        }
    } else {
        const SCALEBITS: u32 = 16;
        const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
        let fix = |x: f64| (x * 65536.0 + 0.5) as i64;
        let clamp = |v: i64| v.clamp(0, 255) as u8;
        for i in 0..w * h {
            let y = i64::from(planes[0][i]);
            let cb = i64::from(planes[1][i]) - 128;
            let cr = i64::from(planes[2][i]) - 128;
            let r_off = (fix(1.40200) * cr + ONE_HALF) >> SCALEBITS;
            let b_off = (fix(1.77200) * cb + ONE_HALF) >> SCALEBITS;
            let g_off = (-fix(0.34414) * cb + ONE_HALF + -fix(0.71414) * cr) >> SCALEBITS;
            pixels[3 * i] = clamp(y + r_off);
            pixels[3 * i + 1] = clamp(y + g_off);
            pixels[3 * i + 2] = clamp(y + b_off);
        }
    }
    Ok(Decoded {
        width: w,
        height: h,
        channels: 3,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow 13.0.0 (libjpeg-turbo 3.2.0) decodes of `scripts/make_jpeg_fixtures.py`'s files:
    /// baseline 4:2:0 / 4:2:2 / 4:4:4, progressive, optimised tables, restart intervals,
    /// grayscale, odd and tiny sizes. The pixels must be equal.
    #[test]
    fn pixels_equal_pillow() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jpeg.safetensors");
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
        let mut names: Vec<&String> = t.keys().filter(|k| k.ends_with(".jpg")).collect();
        names.sort();
        assert_eq!(names.len(), 11);
        for name in names {
            let data = t[name].to_vec1::<u8>().unwrap();
            let want_t = &t[&name.replace(".jpg", ".rgb")];
            let want = want_t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let got = decode(&data, 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
            let dims = want_t.dims();
            assert_eq!((got.height, got.width), (dims[0], dims[1]), "{name}");
            assert_eq!(got.channels, if dims.len() == 3 { 3 } else { 1 }, "{name}");
            let diff = got.pixels.iter().zip(&want).filter(|(a, b)| a != b).count();
            let max = got
                .pixels
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            assert_eq!(
                diff,
                0,
                "{name}: {diff} of {} bytes differ (max {max})",
                want.len()
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"\xFF\xD8\xFF", 100).is_err());
        let mut data = vec![
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x0B, 8, 0, 4, 0, 4, 1, 1, 0x11, 0,
        ];
        data.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, 0x12, 0x34, 0xFF, 0xD9]);
        // No tables: an error, whatever the bytes.
        assert!(decode(&data, 100).is_err());
        for cut in 0..data.len() {
            let _ = decode(&data[..cut], 100);
        }
    }

    /// Corrupted and truncated real files end in an error or some pixels, never a panic.
    #[test]
    fn corrupt_files_do_not_panic() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jpeg.safetensors");
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for name in t.keys().filter(|k| k.ends_with(".jpg")) {
            let data = t[name].to_vec1::<u8>().unwrap();
            for _ in 0..150 {
                let mut bad = data.clone();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % bad.len();
                    bad[i] = next() as u8;
                }
                let _ = decode(&bad, 1 << 16);
                let cut = (next() as usize) % data.len();
                let _ = decode(&data[..cut], 1 << 16);
            }
        }
    }
}
