#ifndef OPENMM_WINDOWS_EXPORT_FLASHIPA_H_
#define OPENMM_WINDOWS_EXPORT_FLASHIPA_H_
// Symbol visibility for the plugin's public classes (only matters on Windows; kept for OpenMM parity).
#if defined(_MSC_VER) && defined(OPENMM_FLASHIPA_BUILDING_SHARED_LIBRARY)
#define OPENMM_EXPORT_FLASHIPA __declspec(dllexport)
#elif defined(_MSC_VER)
#define OPENMM_EXPORT_FLASHIPA __declspec(dllimport)
#else
#define OPENMM_EXPORT_FLASHIPA
#endif
#endif
